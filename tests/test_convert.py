"""`llamette convert`: Meta, Hugging Face, llama2.c and GGUF sources, byte for byte as export.py."""

import json
import shutil
import struct
import zipfile

import numpy as np
import pytest

from conftest import shared_path
from llamette.cli import main
from llamette.formats import read_model
from llamette.formats.gguf import GGUFFile
from llamette.formats.llama2c import V0_HEADER_BYTES, read_llama2c
from llamette.formats.meta import read_meta


def convert(capsys, *argv):
    status = main(["convert", *map(str, argv)])
    _, err = capsys.readouterr()
    return status, err


def assert_same_llama2c_file(ours, theirs):
    """Equal bytes, except v0's RoPE tables (no reader uses them): those within 1e-6."""
    ours, theirs = ours.read_bytes(), theirs.read_bytes()
    assert len(ours) == len(theirs)
    if ours[:4] == theirs[:4] and struct.unpack_from("<I", ours)[0] == 0x616B3432:
        assert ours == theirs
        return
    dim, _, n_layers, n_heads, n_kv_heads, vocab, seq_len = struct.unpack_from("<7i", theirs)
    head_size = dim // n_heads
    tables = 4 * seq_len * head_size
    # the tables sit just before the untied classifier (if any) at the end
    end = len(theirs) - (4 * abs(vocab) * dim if vocab < 0 else 0)
    start = end - tables
    assert ours[:start] == theirs[:start] and ours[end:] == theirs[end:]
    np.testing.assert_allclose(
        np.frombuffer(ours[start:end], np.float32),
        np.frombuffer(theirs[start:end], np.float32),
        rtol=0,
        atol=1e-6,
    )
    assert start > V0_HEADER_BYTES


@pytest.mark.parametrize(
    "source, out_format, expected",
    [
        ("rand-gqa-meta", "llama2c-v0", "rand-gqa-meta.v0.bin"),
        ("hf-mha", "llama2c-v0", "hf-mha.v0.bin"),
        ("hf-mha", "llama2c-v2", "hf-mha.v2.bin"),
        ("rand-gqa.v0.bin", "llama2c-v1", "rand-gqa.v1.bin"),
        ("rand-gqa.v0.bin", "llama2c-v2", "rand-gqa.v2.bin"),
        ("stories260K.bin", "llama2c-v2", "stories260K_q80.bin"),
    ],
)
def test_writes_what_export_py_wrote(capsys, tmp_path, source, out_format, expected):
    models = shared_path("models")
    out = tmp_path / "out.bin"
    status, err = convert(capsys, models / source, out, "--format", out_format)
    assert status == 0, err
    assert_same_llama2c_file(out, models / expected)


def test_groups_that_straddle_rows_are_said_once_at_writing(capsys, tmp_path, models):
    """export.py's group size 64 does not divide stories260K's hidden 172: runq.c misreads it."""
    status, err = convert(
        capsys, models / "stories260K.bin", tmp_path / "q.bin", "--format", "llama2c-v2"
    )
    assert status == 0 and err.count("runq.c will misread") == 1
    assert "172 columns" in err and "--group-size 4 divides every row" in err
    status, err = convert(capsys, models / "stories260K.bin", tmp_path / "q4.bin",
                          "--format", "llama2c-v2", "--group-size", "4")  # fmt: skip
    assert status == 0 and "misread" not in err


def test_meta_shards_are_joined_along_the_right_axis(models):
    meta = read_meta(models / "rand-gqa-meta")
    reference = read_llama2c(models / "rand-gqa.v0.bin")
    assert meta.config.n_kv_heads == 2 and not meta.config.shared_classifier
    for name in ("tok_embeddings.weight", "layers.1.attention.wo.weight", "layers.2.attention.wk.weight",
                 "layers.3.feed_forward.w2.weight", "output.weight", "norm.weight"):  # fmt: skip
        np.testing.assert_array_equal(meta[name], reference[name], err_msg=name)


def test_meta_scaled_rope_has_the_frequencies_of_transformers_llama3_rope(tmp_path, models):
    """use_scaled_rope (Llama 3.1's params.json): Meta's constants, factor 8 over an original
    context of 8192; a theta of 500,000 puts the 8 frequencies in each of the three bands."""
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    folder = tmp_path / "meta"
    shutil.copytree(models / "rand-gqa-meta", folder)
    params = json.loads((folder / "params.json").read_text())
    params.update(use_scaled_rope=True, rope_theta=500000.0)
    (folder / "params.json").write_text(json.dumps(params))
    weights = read_meta(folder)
    assert weights.config.rope_scaled and weights.config.head_size == 16

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      max_position_embeddings=131072, rope_parameters=rope)  # fmt: skip
    expected = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0].numpy()
    unscaled = 500000.0 ** -(np.arange(0, 16, 2) / 16)
    scaled = unscaled / weights["rope_freqs.weight"]
    assert len(set(np.round(weights["rope_freqs.weight"], 3))) == 3  # 1, 8 and between
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


def test_gguf_from_another_project_reads_as_the_llama2c_file(models):
    gguf = read_model(models / "stories260K.gguf")
    reference = read_llama2c(models / "stories260K.bin")
    assert gguf.config.dim == reference.config.dim and gguf.config.seq_len == 2048
    for name, tensor in reference.tensors.items():
        np.testing.assert_array_equal(gguf[name], tensor, err_msg=name)


def test_gguf_round_trip_through_llama2c(capsys, tmp_path, models):
    gguf_file, back = tmp_path / "model.gguf", tmp_path / "back.bin"
    source = models / "rand-gqa.v1.bin"
    assert convert(capsys, source, gguf_file, "--tokenizer", models / "tokenizer.bin")[0] == 0
    assert convert(capsys, gguf_file, back, "--format", "llama2c-v1")[0] == 0
    assert back.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("weight_type", ["f16", "bf16", "q8_0", "q4_k_m"])
def test_a_gguf_converts_in_its_own_types_by_default(capsys, tmp_path, models, weight_type):
    """Without --type, GGUF keeps the source's types: each matrix's blocks copied as they are."""
    source, copy = tmp_path / f"{weight_type}.gguf", tmp_path / "copy.gguf"
    status, _ = convert(capsys, models / "stories260K.bin", source, "--type", weight_type,
                        "--tokenizer", models / "tok512.bin")  # fmt: skip
    assert status == 0
    status, err = convert(capsys, source, copy)
    assert status == 0 and f"gguf {weight_type})" in err
    theirs, ours = GGUFFile(source), GGUFFile(copy)
    for name, info in theirs.tensors.items():
        assert ours.tensors[name].gguf_type == info.gguf_type
        np.testing.assert_array_equal(
            ours.tensor_data(ours.tensors[name]), theirs.tensor_data(info)
        )


def test_tokenizer_model_to_tokenizer_bin(capsys, tmp_path, models):
    for name in ("tokenizer", "tok512"):
        out = tmp_path / f"{name}.bin"
        status, err = convert(capsys, models / f"{name}.model", out)
        assert status == 0, err
        assert out.read_bytes() == (models / f"{name}.bin").read_bytes()


def torch_pickle_calling(tmp_path, module, name):
    """A torch-style zip checkpoint whose pickle asks for module.name (never loaded by the test)."""
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x04\x00\x00\x00echo\x85R."
    path = tmp_path / "consolidated.00.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("consolidated.00/data.pkl", payload)
    return path


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: torch_pickle_calling(d, "os", "system"), "asks for os.system"),
        (lambda d: (d / "params.json").write_text("{"), "params.json: not valid JSON"),
        (lambda d: (d / "consolidated.01.pth").unlink(), "its config says (32000, 64)"),
        (
            lambda d: (d / "params.json").unlink() or (d / "config.json").write_text("{}"),
            "architecture unknown is not supported",
        ),  # fmt: skip
        (
            lambda d: (d / "consolidated.00.pth").write_bytes(b"PK\x03\x04 cut"),
            "consolidated.00.pth",
        ),
    ],
)
def test_bad_meta_folders_name_the_file_and_leave_no_output(
    capsys, tmp_path, models, edit, message
):
    folder = tmp_path / "meta"
    folder.mkdir()
    for path in (models / "rand-gqa-meta").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    edit(folder)
    out = tmp_path / "out.bin"
    status, err = convert(capsys, folder, out)
    assert status == 2
    assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [folder]


def test_truncated_safetensors(capsys, tmp_path, models):
    folder = tmp_path / "hf"
    folder.mkdir()
    for path in (models / "hf-mha").iterdir():
        data = path.read_bytes()
        (folder / path.name).write_bytes(
            data[: len(data) // 2] if path.suffix == ".safetensors" else data
        )
    status, err = convert(capsys, folder, tmp_path / "out.bin")
    assert status == 2 and "model.safetensors: truncated" in err, err
    assert not (tmp_path / "out.bin").exists()


def test_llama2c_cannot_hold_another_rope_theta(capsys, tmp_path, models):
    folder = tmp_path / "hf"
    folder.mkdir()
    for path in (models / "hf-mha").iterdir():
        text = path.read_bytes().replace(b'"rope_theta": 10000.0', b'"rope_theta": 500000.0')
        (folder / path.name).write_bytes(text)
    status, err = convert(capsys, folder, tmp_path / "out.bin")
    assert status == 2 and "rope_theta 500000" in err and "GGUF" in err, err
    assert convert(capsys, folder, tmp_path / "out.gguf")[0] == 0
    assert read_model(tmp_path / "out.gguf").config.rope_theta == 500000.0


def test_unwritable_output(capsys, tmp_path, models):
    status, err = convert(capsys, models / "stories260K.bin", tmp_path / "missing" / "out.bin")
    assert status == 2 and f"the folder {tmp_path / 'missing'} does not exist" in err, err
    assert ".partial" not in err  # the temporary file is ours, not the user's


def test_nonsense_flags(capsys, models, tmp_path):
    status, err = convert(capsys, models / "stories260K.bin", tmp_path / "o.bin", "--type", "q8_0")
    assert status == 2 and "llama2c-v0 holds f32" in err
    status, err = convert(
        capsys, models / "stories260K.bin", tmp_path / "o.bin", "--format", "onnx"
    )
    assert status == 2 and "--format" in err
    assert list(tmp_path.iterdir()) == []
