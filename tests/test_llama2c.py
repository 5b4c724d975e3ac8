"""Reading llama2.c checkpoints: the three versions, bad files, and weights used in place."""

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llamette import LlametteError
from llamette.formats.llama2c import read_llama2c
from llamette.weight_types import Q8Tensor


def test_reads_all_three_versions_of_one_model(models):
    v0, v1, v2 = (read_llama2c(models / f"rand-gqa.v{v}.bin") for v in range(3))
    assert v0.config == v1.config == v2.config
    c = v0.config
    assert (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads) == (64, 192, 4, 4, 2)
    assert (c.vocab_size, c.seq_len, c.shared_classifier) == (32000, 256, False)
    assert v0.tensors.keys() == v1.tensors.keys() == v2.tensors.keys()
    for name, tensor in v0.tensors.items():
        assert np.array_equal(tensor, v1[name]), name
        if isinstance(v2[name], Q8Tensor):
            # Q8 with groups of 64: each value within half a quantization step of the fp32 one
            q = v2[name]
            step = np.repeat(q.scales, q.group_size).reshape(q.shape)
            assert np.all(np.abs(q.dequantize() - tensor) <= step / 2 + 1e-7), name
        else:
            assert np.array_equal(v2[name], tensor), name


def test_shared_classifier_and_group_size_come_from_the_header(models):
    stories = read_llama2c(models / "stories260K.bin")
    assert stories.config.shared_classifier and "output.weight" not in stories.tensors
    assert stories.classifier is stories["tok_embeddings.weight"]
    assert (
        read_llama2c(models / "stories260K_q80_gs8.bin")["layers.0.attention.wq.weight"].group_size
        == 8
    )
    assert read_llama2c(models / "stories260K_q80.bin")["norm.weight"].dtype == np.float32


def test_tensors_are_read_only_views_of_the_file(models):
    weights = read_llama2c(models / "rand-gqa.v0.bin")
    for tensor in weights.tensors.values():
        assert not tensor.flags.owndata and not tensor.flags.writeable


def _copy(models, name, tmp_path, edit):
    data = bytearray((models / name).read_bytes())
    data = edit(data)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "name, edit, message",
    [
        (
            "stories260K.bin",
            lambda d: d[:-4],
            r"truncated: its header describes 1056540 bytes, the file has 1056536",
        ),
        ("rand-gqa.v2.bin", lambda d: d[:-1], r"truncated"),
        ("rand-gqa.v1.bin", lambda d: d[:100], r"shorter than the 256-byte header"),
        ("stories260K.bin", lambda d: d[:20], r"too short"),
        ("stories260K.bin", lambda d: d + b"\0" * 8, r"8 bytes beyond what its header describes"),
        (
            "rand-gqa.v2.bin",
            lambda d: d[:37] + struct.pack("<i", 48) + d[41:],
            r"group size 48 does not divide",
        ),
        ("rand-gqa.v2.bin", lambda d: d[:37] + struct.pack("<i", 0) + d[41:], r"group size 0"),
        (
            "rand-gqa.v1.bin",
            lambda d: d[:4] + struct.pack("<i", 3) + d[8:],
            r"version 3 is not supported",
        ),
        ("rand-gqa.v1.bin", lambda d: d[:36] + b"\x07" + d[37:], r"shared-classifier flag is 7"),
        ("stories260K.bin", lambda d: struct.pack("<i", 63) + d[4:], r"whole, even-sized heads"),
        ("tok512.bin", lambda d: d, r"not a llama2.c checkpoint"),
        ("stories260K.gguf", lambda d: d, r"is a GGUF file"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(models, tmp_path, name, edit, message):
    path = _copy(models, name, tmp_path, edit)
    with pytest.raises(LlametteError, match=message) as error:
        read_llama2c(path)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(LlametteError, match="no such file"):
        read_llama2c(tmp_path / "nothing.bin")
    with pytest.raises(LlametteError, match="is a directory"):
        read_llama2c(tmp_path)


def write_random_v0(path, dim, hidden_dim, n_layers, n_heads, vocab_size, seq_len, seed=0):
    """A v0 file with a shared classifier and small random weights, written in 16 MB chunks."""
    head_size = dim // n_heads
    floats = (
        vocab_size * dim
        + n_layers * (2 * dim + 4 * dim * dim + 3 * dim * hidden_dim)
        + dim
        + seq_len * head_size
    )
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(
            struct.pack("<7i", dim, hidden_dim, n_layers, n_heads, n_heads, vocab_size, seq_len)
        )
        for start in range(0, floats, 1 << 22):
            count = min(1 << 22, floats - start)
            f.write((rng.standard_normal(count, np.float32) * np.float32(0.05)).tobytes())
    return path


def test_running_a_large_model_does_not_copy_its_weights(tmp_path):
    # as many layers, so that the small model's decode step is the large one's compiled code
    small = write_random_v0(tmp_path / "small.bin", 64, 128, 4, 4, 512, 16)
    large = write_random_v0(tmp_path / "large.bin", 768, 2048, 4, 12, 32000, 64)
    size = large.stat().st_size
    assert size > 200e6
    script = textwrap.dedent(f"""
        from llamette import Transformer

        def rss(field):
            for line in open("/proc/self/status"):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024

        Transformer.load({str(small)!r}).forward(1, 0)  # compile the kernels first
        anon, file = rss("RssAnon"), rss("RssFile")
        model = Transformer.load({str(large)!r})
        for pos in range(3):
            model.forward(pos + 5, pos)
        print(rss("RssAnon") - anon, rss("RssFile") - file)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    anon_growth, file_growth = map(int, out.stdout.split())
    assert anon_growth < size / 20, f"anonymous memory grew {anon_growth / 1e6:.0f} MB"
    assert file_growth > size * 0.9, (
        "the forward pass should have read the weights from the mapping"
    )
