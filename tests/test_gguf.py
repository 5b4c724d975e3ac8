"""GGUF files: run with their own tokenizer and metadata, checked against run.c and gguf-py."""

import mmap
from pathlib import Path

import gguf
import numpy as np
import pytest

import llamette
from conftest import (
    expected_rows,
    llama_cpp_logits,
    llama_cpp_model,
    mean_kl,
    numpy_forward,
    quantized_by_llama_cpp,
    shared_path,
)
from llamette import Sampler, Tokenizer, Transformer, generate, weight_types
from llamette.cli import main
from llamette.formats import gguf as gguf_format
from llamette.formats import load_weights, read_model
from llamette.formats.gguf import GGUFModel, gguf_name, write_gguf
from llamette.formats.llama2c import read_llama2c, write_llama2c
from llamette.weight_types import Q8_0Tensor, Q8Tensor, nbytes

BUNDLED = Path(llamette.__file__).parent / "bundled"
# types whose products take their input rounded to 8 bits in groups of 32, as llama.cpp does
ROUNDED_INPUTS = {
    gguf.GGMLQuantizationType[name] for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
}


def values_by_gguf_py(path, config) -> tuple[dict, set]:
    """A GGUF's tensors dequantized by gguf-py, by Meta's names, and the names of the matrices
    whose products round their input to 8 bits."""
    reader = {t.name: t for t in gguf.GGUFReader(path).tensors}
    dequantized, rounded = {}, set()
    for name in config.tensor_shapes():
        tensor = reader[gguf_name(name)]
        dequantized[name] = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if tensor.tensor_type in ROUNDED_INPUTS:
            rounded.add(name)
    return dequantized, rounded


def recorded_greedy_stories260K(row):
    return (
        row["argv"][0] == "stories260K.bin"
        and "-m" not in row["argv"]
        and dict(zip(row["argv"][1::2], row["argv"][2::2], strict=True)).get("-t") == "0"
    )


@pytest.mark.parametrize("row", expected_rows("generate.jsonl", keep=recorded_greedy_stories260K))
def test_stories260K_gguf_gives_run_c_tokens(row):
    """stories260K.gguf (made by another project) with its embedded tokenizer, as run.c ran the .bin."""
    path = shared_path("models", "stories260K.gguf")
    model = Transformer.load(path)
    tokenizer = GGUFModel(path).tokenizer()
    steps = int(row["argv"][row["argv"].index("-n") + 1])
    result = generate(
        model, tokenizer, Sampler(model.config.vocab_size, 0.0), row["prompt"] or "", steps
    )
    assert result.prompt_tokens[1:] + result.tokens == row["ids"]


def test_embedded_tokenizer_is_the_llama2c_one(models):
    embedded = GGUFModel(models / "stories260K.gguf").tokenizer()
    llama2c = Tokenizer.load(models / "tok512.bin")
    assert embedded.pieces == llama2c.pieces and embedded.scores == llama2c.scores


def test_metadata_is_used(models):
    config = Transformer.load(models / "stories260K.gguf").config
    assert (config.seq_len, config.n_kv_heads, config.norm_eps) == (2048, 4, pytest.approx(1e-5))


@pytest.mark.parametrize(
    "weight_type", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
)
def test_written_tensors_read_back_through_gguf_py(tmp_path, models, weight_type):
    out = tmp_path / "rand-gqa.gguf"
    status = main(["convert", str(models / "rand-gqa.v1.bin"), str(out), "--type", weight_type,
                   "--tokenizer", str(models / "tokenizer.bin")])  # fmt: skip
    assert status == 0
    reader = gguf.GGUFReader(out)
    source = Transformer.load(models / "rand-gqa.v1.bin")
    tensors = {t.name: t for t in reader.tensors}
    wq = tensors[gguf_name("layers.1.attention.wq.weight")]
    expected = source.weights["layers.1.attention.wq.weight"]
    if weight_type != "f32":
        assert gguf.GGMLQuantizationType(wq.tensor_type).name == weight_type.upper()
    values = gguf.quants.dequantize(wq.data, wq.tensor_type)
    tolerance = {
        "f32": 0,
        "f16": 1e-3,
        "bf16": 1e-2,
        "q8_0": 1e-2,
        "q4_0": 0.2,
        "q4_1": 0.2,
        "q5_0": 0.1,
        "q5_1": 0.1,
    }[weight_type]
    assert np.abs(values - expected).max() <= tolerance * np.abs(expected).max()


def test_q8_0_gguf_runs_on_the_values_gguf_py_reads(tmp_path, models):
    out = tmp_path / "model.gguf"
    assert main(["convert", str(models / "rand-gqa.v1.bin"), str(out), "--type", "q8_0",
                 "--tokenizer", str(models / "tokenizer.bin")]) == 0  # fmt: skip
    weights = Transformer.load(out).weights
    reader = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w2.weight", "output.weight"):
        tensor = reader[gguf_name(name)]
        np.testing.assert_array_equal(
            weights[name].dequantize(), gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        )


def convert_to(tmp_path, source, name, *flags):
    out = tmp_path / name
    assert main(["convert", str(source), str(out), *map(str, flags)]) == 0
    return out


@pytest.fixture
def q8_0_gguf(tmp_path, models):
    """rand-gqa (dim 64, hidden 192: every matrix whole blocks) as a Q8_0 GGUF."""
    return convert_to(tmp_path, models / "rand-gqa.v1.bin", "rand-gqa.q8_0.gguf", "--type",
                      "q8_0", "--tokenizer", models / "tokenizer.bin")  # fmt: skip


def is_file_mapped(array: np.ndarray, path: Path) -> bool:
    """Whether an array is a view of the bytes of `path`, mapped into memory: a view of a
    read-only memory map whose bytes are the file's."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    base = base.obj if isinstance(base, memoryview) else base
    return isinstance(base, mmap.mmap) and base[:64] == path.read_bytes()[:64]


def test_q8_0_matrices_stay_views_of_the_file(q8_0_gguf):
    model = GGUFModel(q8_0_gguf)
    weights = model.runnable_weights()
    in_file = {t.name: t for t in gguf.GGUFReader(q8_0_gguf).tensors}
    for name, shape in weights.config.tensor_shapes().items():
        tensor = weights[name]
        if len(shape) == 1:
            continue
        assert isinstance(tensor, Q8_0Tensor) and tensor.shape == shape
        assert is_file_mapped(tensor.blocks, q8_0_gguf)
        assert np.array_equal(tensor.blocks.ravel(), in_file[gguf_name(name)].data.ravel())
        assert nbytes(tensor) == in_file[gguf_name(name)].n_bytes


def test_q8_0_gguf_computes_what_its_llama2c_v2_twin_computes(tmp_path, q8_0_gguf):
    """Q8_0 blocks and v2's Q8 groups of the same values through their own kernels: the same
    logits to the bit, token by token (default and --exact) and in batches (up to SMALL_BATCH
    rows and beyond)."""
    # the twin: each block's int8 values and scale (as float32) in groups of 32
    v2_path = convert_to(tmp_path, q8_0_gguf, "twin.v2.bin", "--format", "llama2c-v2",
                         "--group-size", "32")  # fmt: skip
    gguf_weights, v2_weights = load_weights(q8_0_gguf), read_llama2c(v2_path)
    blocks = gguf_weights["layers.0.attention.wq.weight"]
    groups = v2_weights["layers.0.attention.wq.weight"]
    assert isinstance(blocks, Q8_0Tensor) and isinstance(groups, Q8Tensor)
    np.testing.assert_array_equal(blocks.dequantize(), groups.dequantize())  # the same values
    tokens = [1, 450, 4996, 17354, 1701, 29916]
    for exact in (False, True):
        ours, twin = Transformer(gguf_weights, exact=exact), Transformer(v2_weights, exact=exact)
        for pos, token in enumerate(tokens):
            np.testing.assert_array_equal(ours.forward(token, pos), twin.forward(token, pos))
    for n in (len(tokens), 40):
        batch = (np.arange(n) * 997 % 32000, np.arange(n), np.zeros(n, np.int64))
        ours, twin = Transformer(gguf_weights), Transformer(v2_weights)
        np.testing.assert_array_equal(ours.forward_batch(*batch), twin.forward_batch(*batch))


def test_q8_0_gguf_converts_to_the_same_bytes_from_its_blocks(tmp_path, q8_0_gguf):
    """Converting a Q8_0 GGUF (gguf-py dequantizes it) gives back its blocks as Q8_0, and the
    writers given the memory-mapped blocks themselves write the same files."""
    tokenizer = GGUFModel(q8_0_gguf).tokenizer()
    again = convert_to(tmp_path, q8_0_gguf, "again.gguf", "--type", "q8_0")
    source = {t.name: t for t in gguf.GGUFReader(q8_0_gguf).tensors}
    for tensor in gguf.GGUFReader(again).tensors:
        np.testing.assert_array_equal(tensor.data, source[tensor.name].data)

    v2 = convert_to(tmp_path, q8_0_gguf, "model.v2.bin", "--format", "llama2c-v2")
    from_blocks = tmp_path / "from-blocks"
    from_blocks.mkdir()
    running = load_weights(q8_0_gguf)
    assert isinstance(running["output.weight"], Q8_0Tensor)
    write_gguf(running, from_blocks / "again.gguf", tokenizer, "q8_0")
    write_llama2c(running, from_blocks / "model.v2.bin", version=2)
    assert (from_blocks / "again.gguf").read_bytes() == again.read_bytes()
    assert (from_blocks / "model.v2.bin").read_bytes() == v2.read_bytes()


@pytest.mark.parametrize("weight_type", ["f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_each_type_runs_in_its_own_layout_close_to_its_values(tmp_path, models, weight_type):
    """Logits of F16, BF16, Q4_0, Q4_1, Q5_0 and Q5_1 GGUF files against a float64 NumPy forward over the
    weights dequantized by gguf-py. Inputs to 4-bit matrices are rounded to 8 bits as llama.cpp
    rounds them: where a value lies within float32 error of a rounding boundary, the two forwards
    may round it apart, which moves this random model's logits by up to about 0.5% (the products
    alone agree within 1e-5: test_weight_types)."""
    out = tmp_path / f"rand-gqa.{weight_type}.gguf"
    assert main(["convert", str(models / "rand-gqa.v1.bin"), str(out), "--type", weight_type,
                 "--tokenizer", str(models / "tokenizer.bin")]) == 0  # fmt: skip
    model = Transformer.load(out)
    kind = type(model.weights["layers.0.attention.wq.weight"]).__name__
    assert kind == f"{weight_type.upper()}Tensor"
    dequantized, rounded = values_by_gguf_py(out, model.config)
    tokens = [1, 450, 4996, 17354, 1701, 29916]
    expected = numpy_forward(model.config, dequantized, tokens, rounded)
    tolerance = 1e-2 if rounded else 1e-4
    scale = np.abs(expected).max()
    batched = model.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    assert np.abs(batched - expected).max() < tolerance * scale
    for pos, token in enumerate(tokens):
        assert np.abs(model.forward(token, pos) - expected[pos]).max() < tolerance * scale


def test_types_without_a_kernel_say_so(tmp_path, models, capsys, monkeypatch):
    """A file in a type llamette does not run (MXFP4, gpt-oss's): one line naming it, exit 2."""
    mxfp4 = gguf.GGMLQuantizationType.MXFP4
    quantize = gguf.quants.quantize

    def zero_blocks(values, qtype):  # gguf-py does not quantize MXFP4; the bytes do not matter
        if qtype != mxfp4:
            return quantize(values, qtype)
        return np.zeros(gguf.quants.quant_shape_to_byte_shape(values.shape, qtype), np.uint8)

    monkeypatch.setattr(gguf_format, "GGUF_TYPES", (*gguf_format.GGUF_TYPES, "mxfp4"))
    monkeypatch.setattr(gguf.quants, "quantize", zero_blocks)
    out = tmp_path / "model.gguf"
    gguf_format.write_gguf(read_model(models / "stories260K.bin"), out,
                           Tokenizer.load(models / "tok512.bin"),
                           tensor_types={"layers.1.attention.wq.weight": "mxfp4"})  # fmt: skip
    status = main(["run", str(out), "-n", "8"])
    err = capsys.readouterr().err
    assert (
        status == 2
        and "blk.1.attn_q.weight is MXFP4" in err
        and "convert" in err
        and err.count("\n") == 1
    )


@pytest.mark.parametrize(
    "keep, problem",
    [
        (10, "not a GGUF file (10 bytes)"),
        (100, "truncated: the file ends (at byte 100) in tokenizer.ggml.tokens, after 2 of its"),
        (20_000, "truncated: tensor token_embd.weight takes bytes 14176 to 145248, the file has"),
        (600_000, "truncated: tensor blk.1.ffn_up.weight takes bytes"),
    ],
)
def test_truncated_gguf_says_what_is_missing(tmp_path, models, capsys, keep, problem):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes((models / "stories260K.gguf").read_bytes()[:keep])
    status = main(["run", str(cut), "-n", "8"])
    err = capsys.readouterr().err
    assert status == 2 and f"cut.gguf: {problem}" in err and err.count("\n") == 1, err


def greedy_llama_cpp(path, prompt_tokens: list[int], steps: int) -> list[int]:
    """llama.cpp's greedy tokens after prompt_tokens, up to `steps` positions or its EOS."""
    llama = llama_cpp_model(path, n_ctx=512, n_threads=2)
    tokens = []
    for token in llama.generate(prompt_tokens, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if token == llama.token_eos() or len(prompt_tokens) + len(tokens) >= steps:
            return tokens
    return tokens


@pytest.mark.parametrize("weight_type", ["f32", "q8_0"])
def test_written_gguf_gives_llama_cpp_the_same_greedy_tokens(tmp_path, models, weight_type):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    out = tmp_path / f"stories260K.{weight_type}.gguf"
    assert main(["convert", str(models / "stories260K.bin"), str(out), "--type", weight_type]) == 0
    prompt = "Once upon a time, there was a"

    model = Transformer.load(out)
    tokenizer = GGUFModel(out).tokenizer()
    ours = generate(model, tokenizer, Sampler(model.config.vocab_size, 0.0), prompt, 120)
    theirs = greedy_llama_cpp(out, ours.prompt_tokens, 120)
    assert theirs == ours.tokens[: len(theirs)] and len(theirs) >= 100


LLAMA_CPP_FILE_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S", "Q5_K_M",
                        "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS"]  # fmt: skip


def small_model(models: Path, name: str) -> tuple[Path, Path]:
    """A trained test model by name: its llama2.c file and its tokenizer.bin."""
    return {"stories260K": (models / "stories260K.bin", models / "tok512.bin"),
            "bundled": (BUNDLED / "model.bin", BUNDLED / "tokenizer.bin")}[name]  # fmt: skip


def assert_picks_llama_cpp_s_greedy_tokens(path: Path) -> None:
    """Along 100 tokens of llama.cpp's greedy continuation of a prompt, the two engines'
    next-token distributions agree (mean KL under 1e-3 nats) and llamette's most likely token is
    llama.cpp's, but where its top two logits are closer than the two engines' logits are to each
    other there. (llama.cpp rounds activations with fp16 scales, and keeps its KV cache in fp16:
    the logits differ by a few tenths, and two free-running continuations part at the first such
    near tie.)"""
    prompt = GGUFModel(path).tokenizer().encode("Once upon a time, there was a", bos=True)
    theirs = greedy_llama_cpp(path, prompt, len(prompt) + 100)
    assert len(theirs) == 100
    tokens = prompt + theirs
    model = Transformer.load(path)
    ours = model.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    reference = llama_cpp_logits(path, tokens)
    assert mean_kl(reference, ours) < 1e-3
    flips = 0
    for position in range(len(prompt) - 1, len(tokens) - 1):
        if ours[position].argmax() != tokens[position + 1]:
            best, second = np.sort(ours[position])[::-1][:2]
            disagreement = np.abs(ours[position] - reference[position]).max()
            assert best - second < disagreement, (position, best, second, disagreement)
            flips += 1
    assert flips <= 3


@pytest.mark.parametrize("weight_type", ["q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("model_name", ["stories260K", "bundled"])
def test_4_and_5_bit_ggufs_pick_llama_cpp_s_greedy_tokens(tmp_path, models, weight_type,
                                                          model_name):  # fmt: skip
    """Files llamette writes (gguf-py's quantizers) against llama.cpp on them."""
    source, vocabulary = small_model(models, model_name)
    out = tmp_path / f"{model_name}.{weight_type}.gguf"
    assert main(["convert", str(source), str(out), "--type", weight_type,
                 "--tokenizer", str(vocabulary)]) == 0  # fmt: skip
    assert_picks_llama_cpp_s_greedy_tokens(out)


@pytest.mark.parametrize("file_type", LLAMA_CPP_FILE_TYPES)
@pytest.mark.parametrize("model_name", ["stories260K", "bundled"])
def test_files_quantized_by_llama_cpp_pick_its_greedy_tokens(tmp_path, models, file_type,
                                                             model_name):  # fmt: skip
    """llama.cpp's file types as llama.cpp writes them: on these small models (rows of 64, 128,
    172 or 384 values) its K-quant types fall back to Q5_0, Q8_0, Q4_0 and F16 matrices."""
    source, vocabulary = small_model(models, model_name)
    f32 = tmp_path / f"{model_name}.f32.gguf"
    assert main(["convert", str(source), str(f32), "--tokenizer", str(vocabulary)]) == 0
    out = quantized_by_llama_cpp(f32, tmp_path / f"{model_name}.{file_type}.gguf", file_type)
    stored = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(out).tensors}
    not_run = stored - {name.upper() for name in weight_types.gguf_names()}
    if not_run:
        pytest.skip(f"llamette does not run {', '.join(sorted(not_run))} yet")
    assert_picks_llama_cpp_s_greedy_tokens(out)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K",
                                       "IQ4_XS"])  # fmt: skip
def test_k_quant_files_give_llama_cpp_s_next_token_distributions(tmp_path, model_of_whole_k_blocks,
                                                                 file_type):  # fmt: skip
    """llama.cpp's K-quant file types on rows of whole K blocks: the mean KL between its
    next-token distributions and llamette's over 256 positions is under 1e-3 nats, and llamette's
    are as close to the F32 model's as llama.cpp's (it rounds inputs to K-quant products in
    groups of 256 values; llamette too in Q4_K's, Q5_K's and Q6_K's row dot products, in groups
    of 32 elsewhere). The bound holds for models whose residual
    stream does not amplify rounding errors (this one: the quantization itself costs 0.03 nats
    for Q4_K_M)."""
    out = quantized_by_llama_cpp(model_of_whole_k_blocks, tmp_path / f"{file_type}.gguf", file_type)
    stored = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(out).tensors}
    assert stored & {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}  # not only fallbacks
    not_run = stored - {name.upper() for name in weight_types.gguf_names()}
    if not_run:
        pytest.skip(f"llamette does not run {', '.join(sorted(not_run))} yet")
    tokens = [1, *np.random.default_rng(3).integers(3, 1024, 255).tolist()]
    model = Transformer.load(out)
    ours = model.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    theirs = llama_cpp_logits(out, tokens)
    assert mean_kl(theirs, ours) < 1e-3
    assert mean_kl(theirs, np.zeros_like(theirs)) > 0.5  # the distributions are far from flat
    f32 = Transformer.load(model_of_whole_k_blocks)
    exact = f32.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    assert mean_kl(exact, ours) < 1.02 * mean_kl(exact, theirs)


MIX = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # seven matrices a layer


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    """The bundled (trained) model as a GGUF whose matrices take the eight types in turn, so that
    types differ across layers and within them (q, k and v of three types), written with
    gguf-py's quantizers."""
    weights = read_model(BUNDLED / "model.bin")
    matrices = [name for name, shape in weights.config.tensor_shapes().items() if len(shape) == 2]
    types = {name: MIX[i % len(MIX)] for i, name in enumerate(matrices)}
    out = tmp_path_factory.mktemp("mixed") / "bundled.mixed.gguf"
    write_gguf(weights, out, Tokenizer.load(BUNDLED / "tokenizer.bin"), tensor_types=types)
    return out


def test_a_file_of_mixed_types_runs_memory_mapped_in_its_own_types(mixed_gguf):
    model = GGUFModel(mixed_gguf)
    weights = model.runnable_weights()
    in_file = {
        t.name: gguf.GGMLQuantizationType(t.tensor_type).name.lower()
        for t in gguf.GGUFReader(mixed_gguf).tensors
    }
    seen = set()
    for name in weights.config.tensor_shapes():
        tensor = weights[name]
        assert in_file[gguf_name(name)] == weight_types.weight_type(tensor).NAME
        seen.add(in_file[gguf_name(name)])
        array = tensor if isinstance(tensor, np.ndarray) else tensor[0]
        assert is_file_mapped(array, mixed_gguf)
    assert seen == set(MIX)
    layer = [
        weight_types.weight_type(weights.layer(0, f"attention.w{m}.weight")).NAME for m in "qkv"
    ]
    assert len(set(layer)) == 3


@pytest.mark.parametrize("exact", [False, True])
def test_a_file_of_mixed_types_gives_the_logits_of_its_values(mixed_gguf, exact):
    """Logits against a float64 NumPy forward over gguf-py's dequantized weights (inputs to the
    Q8_0, Q4 and Q5 matrices rounded as llama.cpp rounds them), token by token and in one
    batch."""
    model = Transformer.load(mixed_gguf, exact=exact)
    dequantized, rounded = values_by_gguf_py(mixed_gguf, model.config)
    tokens = Tokenizer.load(BUNDLED / "tokenizer.bin").encode("Once upon a time, a little fox")
    expected = numpy_forward(model.config, dequantized, tokens, rounded)
    scale = np.abs(expected).max()
    batched = model.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    assert np.abs(batched - expected).max() < 1e-3 * scale
    for pos, token in enumerate(tokens):
        assert np.abs(model.forward(token, pos) - expected[pos]).max() < 1e-3 * scale


def test_a_file_of_mixed_types_gives_llama_cpp_the_same_greedy_tokens(mixed_gguf):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    model = Transformer.load(mixed_gguf)
    tokenizer = GGUFModel(mixed_gguf).tokenizer()
    prompt = "Once upon a time, there was a"
    ours = generate(model, tokenizer, Sampler(model.config.vocab_size, 0.0), prompt, 200)

    llama = llama_cpp_model(mixed_gguf, n_ctx=256, n_threads=2)
    assert llama.tokenize(prompt.encode()) == ours.prompt_tokens
    theirs = []
    for token in llama.generate(ours.prompt_tokens, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if token == llama.token_eos() or len(ours.prompt_tokens) + len(theirs) >= 200:
            break
    assert theirs == ours.tokens[: len(theirs)] and len(theirs) >= 100
