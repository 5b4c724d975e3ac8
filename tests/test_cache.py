"""The compiled-kernel cache: a warm start compiles nothing, and the cache follows the source."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import BUNDLED, FIRST_DRAW, RECORDING_COMPILES, random_model_of_whole_k_blocks
from llamette.ahead import SWITCH, CompileAhead, run
from llamette.errors import LlametteError
from llamette.kernels import cache
from llamette.kernels.simd import FUSED_MADD

RUN_ONE_STEP = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llamette import Transformer
    from llamette.model import forward
    from llamette.weights import ModelConfig, Weights

    config = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=16)
    rng = np.random.default_rng(0)
    tensors = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in config.tensor_shapes().items()}
    model = Transformer(Weights(config, tensors))
    model.forward(1, 0)
    print(json.dumps({"misses": len(forward.stats.cache_misses), "hits": len(forward.stats.cache_hits)}))
""")


def run_step(cache_dir) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RUN_ONE_STEP], capture_output=True, text=True, check=True,
        env={"LLAMETTE_CACHE_DIR": str(cache_dir), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    import json

    return json.loads(done.stdout)


def test_a_warm_start_compiles_nothing(tmp_path):
    assert run_step(tmp_path) == {"misses": 1, "hits": 0}  # cold: compiled, then saved
    assert run_step(tmp_path) == {"misses": 0, "hits": 1}  # warm: loaded
    stamped = tmp_path / f"kernels-{cache.source_hash()}"
    assert any(stamped.glob("model.forward-*.nbi"))


def test_an_unwritable_cache_says_it_is_the_kernel_cache_and_how_to_move_it(tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    locator = cache.PackageCacheLocator(cache.__file__, 1)
    locator.path = blocked / "kernels"  # under a file: cannot be created
    with pytest.raises(LlametteError, match="kernel cache .*LLAMETTE_CACHE_DIR"):
        locator.ensure_cache_path()


def test_the_stamp_covers_every_file_with_compiled_code():
    files = {
        p.relative_to(cache.PACKAGE_DIR).as_posix()
        for pattern in cache.COMPILED_SOURCES
        for p in cache.PACKAGE_DIR.glob(pattern)
    }
    for path in cache.PACKAGE_DIR.rglob("*.py"):
        text = path.read_text()
        if any(mark in text for mark in ("@kernel", "@parallel_kernel", "njit(", "@overload")):
            assert path.relative_to(cache.PACKAGE_DIR).as_posix() in files, path


HELPERS_KERNELS = {"attention_rows", "swiglu_rows", "add_rows", "rope_rows", "store_kv",
                   "sample_logits"}  # fmt: skip


def test_a_cold_start_finds_what_its_helper_compiled(tmp_path):
    """The helper (llamette.ahead) compiles for the argument types the forward pass gives: run
    alone first, it leaves the pass none of its kernels to compile, and the rest."""
    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path), SWITCH: "0"}
    model = str(BUNDLED / "model.bin")
    subprocess.run([sys.executable, "-m", "llamette.ahead", model, "f32", "fast", "last"],
                   env=env, check=True, timeout=600)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", FIRST_DRAW, model], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert not compiled & HELPERS_KERNELS and {"forward", "matmul_f32"} <= compiled


def test_a_helper_is_for_model_files_and_starts_none_of_its_own(tmp_path, monkeypatch):
    assert CompileAhead(str(BUNDLED / "model.bin"), "f32", False).command is not None
    assert CompileAhead(str(tmp_path), "f32", False).command is None  # a folder, or no file
    monkeypatch.setenv(SWITCH, "0")  # as the helper runs
    assert CompileAhead(str(BUNDLED / "model.bin"), "f32", False).command is None


def test_a_helper_started_by_hand_tells_a_bad_file_or_bad_arguments_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.gguf"
    assert run([str(missing), "f32", "fast", "products"]) == 2
    assert capsys.readouterr().err == f"llamette.ahead: {missing}: no such file\n"
    assert run([str(missing), "f32", "quick", "products"]) == 2
    assert capsys.readouterr().err.startswith("usage: python -m llamette.ahead MODEL_FILE")


def test_a_cold_start_of_two_weight_types_shares_their_products_with_its_helper(tmp_path):
    """Layers in Q8_0 and the classifier in F32: the first process compiles the Q8_0 products,
    its helper attention and the F32 products, which the pass then loads instead of compiling."""
    from llamette import Tokenizer
    from llamette.ahead import shared_products
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    model = tmp_path / "mixed.gguf"
    write_gguf(load_weights(BUNDLED / "model.bin"), model, Tokenizer.load(BUNDLED / "tokenizer.bin"),
               "q8_0", tensor_types={"tok_embeddings.weight": "f32"})  # fmt: skip
    first, helpers = shared_products(load_weights(model))
    assert [type(w).__name__ for w in first + helpers] == ["Q8_0Tensor", "ndarray"]

    env = {key: value for key, value in os.environ.items() if key != SWITCH}
    env["LLAMETTE_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, "-c", FIRST_DRAW, str(model)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert not compiled & {"matmul_f32", "attention_rows"}
    assert {"forward", "_matmul_rows", "swiglu_rows"} <= compiled


def test_a_helper_with_time_to_spare_compiles_the_input_quantization_of_other_types(tmp_path):
    """The bundled model's helper (its weights F32) compiles besides the quantization of a
    product's input that every int8-family type shares: a Q8_0 model's first run then loads it."""
    from llamette import Tokenizer
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path / "cache"), SWITCH: "0"}
    subprocess.run([sys.executable, "-m", "llamette.ahead", str(BUNDLED / "model.bin"), "f32",
                    "fast", "last"], env=env, check=True, timeout=600)  # fmt: skip
    model = tmp_path / "q8_0.gguf"
    write_gguf(load_weights(BUNDLED / "model.bin"), model, Tokenizer.load(BUNDLED / "tokenizer.bin"),
               "q8_0")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", FIRST_DRAW, str(model)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert "quantized" not in compiled and "_matmul_rows" in compiled


def test_a_new_weight_types_first_run_loads_the_pass_its_helper_compiled(tmp_path):
    """After the bundled model's kernels (attention and the other steps cached), a Q8_0 model's
    first run compiles the Q8_0 products while its helper compiles the input quantization and the
    pass, which calls the products by their symbols alone: the first process loads that pass
    (linked to its products) and runs it."""
    from llamette import Tokenizer
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    cache = str(tmp_path / "cache")
    subprocess.run([sys.executable, "-m", "llamette.ahead", str(BUNDLED / "model.bin"), "f32",
                    "fast", "last"], env={**os.environ, "LLAMETTE_CACHE_DIR": cache, SWITCH: "0"},
                   check=True, timeout=600)  # fmt: skip
    model = tmp_path / "q8_0.gguf"
    write_gguf(load_weights(BUNDLED / "model.bin"), model, Tokenizer.load(BUNDLED / "tokenizer.bin"),
               "q8_0")  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != SWITCH}
    done = subprocess.run([sys.executable, "-c", FIRST_DRAW, str(model)],
                          env={**env, "LLAMETTE_CACHE_DIR": cache}, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert "forward" not in compiled and "product" in compiled
    # the same logits as a pass compiled here (its cache files gone, no helper)
    helpers_pass = _logits(model, cache, env)
    helpers_files = list(Path(cache).rglob("model.forward-*"))
    assert helpers_files
    for path in helpers_files:
        path.unlink()
    np.testing.assert_array_equal(_logits(model, cache, {**env, SWITCH: "0"}), helpers_pass)


def test_a_helper_done_first_with_its_products_compiles_the_pass_of_several_weight_types(tmp_path):
    """After the bundled model's kernels, a model of Q8_0 layers and an F32 classifier: its
    helper loads the F32 products and, while the first process has not said that its Q8_0
    products are done, compiles the pass, which calls those by their symbols alone. A first run
    that compiles the Q8_0 products loads that pass and gets the logits of a pass compiled in
    process."""
    from llamette import Tokenizer
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    cache = str(tmp_path / "cache")
    env = {**os.environ, "LLAMETTE_CACHE_DIR": cache, SWITCH: "0"}
    subprocess.run([sys.executable, "-m", "llamette.ahead", str(BUNDLED / "model.bin"), "f32",
                    "fast", "last"], env=env, check=True, timeout=600)  # fmt: skip
    model = tmp_path / "mixed.gguf"
    write_gguf(load_weights(BUNDLED / "model.bin"), model, Tokenizer.load(BUNDLED / "tokenizer.bin"),
               "q8_0", tensor_types={"tok_embeddings.weight": "f32"})  # fmt: skip
    helper = subprocess.Popen([sys.executable, "-m", "llamette.ahead", str(model), "f32", "fast",
                               "products"], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert helper.stdout.readline() == "pass\n"
    finally:
        helper.stdin.close()
        helper.wait(timeout=600)
    done = subprocess.run([sys.executable, "-c", FIRST_DRAW, str(model)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert "forward" not in compiled and "product" in compiled
    helpers_pass = _logits(model, cache, env)
    for path in Path(cache).rglob("model.forward-*"):
        path.unlink()
    np.testing.assert_array_equal(_logits(model, cache, env), helpers_pass)


FAST_STEPS = RECORDING_COMPILES + textwrap.dedent("""
    from llamette import Transformer
    from llamette.ahead import compile_attention, compile_products, compile_steps
    model = Transformer.load(sys.argv[1])
    b = model.buffers
    compile_products([model.weights.tensors["layers.0.attention.wq.weight"]], b.inputs, exact=False)
    compile_attention(model.config, b, model.kv_cache, exact=False)
    compile_steps(b, model.kv_cache, exact=False)
    print(json.dumps(sorted(compiled)))
""")


def test_the_fast_kernels_compile_none_of_the_references_code(tmp_path):
    """The fast flavour's exact is None (kernels.flavour), which rules the reference's branches
    out as Numba compiles: a Q8_0 product, attention and the gate compile neither runq.c's Q8_0
    matmul nor run.c's attention (its attend and softmax)."""
    from llamette import Tokenizer
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    model = tmp_path / "q8_0.gguf"
    write_gguf(load_weights(BUNDLED / "model.bin"), model, Tokenizer.load(BUNDLED / "tokenizer.bin"),
               "q8_0")  # fmt: skip
    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path / "cache"), SWITCH: "0"}
    done = subprocess.run([sys.executable, "-c", FAST_STEPS, str(model)], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(done.stdout))
    assert {"product", "attention", "swiglu", "attention_rows"} <= compiled
    assert not compiled & {"q8_0_matmul", "attend", "softmax"}


Q8_PRODUCTS = RECORDING_COMPILES + textwrap.dedent("""
    import numpy as np
    from llamette.ahead import compile_products
    from llamette.kernels.int8 import Int8Inputs
    from llamette.weight_types import quantize_q8
    matrix = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    for group_size in (64, 16):
        compile_products([quantize_q8(matrix, group_size)], Int8Inputs.sized(1, 256, 16), False)
        print(json.dumps(sorted(compiled)))
        compiled.clear()
""")


def test_llama2c_q8_in_whole_groups_of_64_compiles_no_float_products(tmp_path):
    """llama2.c's Q8 in groups of 64 takes the int8 family's integer products: its product
    compiles none of the float products over dequantized values that groups of 16 take."""
    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path), SWITCH: "0"}
    done = subprocess.run([sys.executable, "-c", Q8_PRODUCTS], env=env, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    groups_of_64, groups_of_16 = (set(json.loads(line)) for line in done.stdout.splitlines())
    float_products = {"_dequantize_rows", "_dequantized_rows_times_inputs"}
    assert "_matmul_rows" in groups_of_64 and not groups_of_64 & float_products
    assert float_products <= groups_of_16


LANE_KERNELS = RECORDING_COMPILES + textwrap.dedent("""
    import numpy as np
    from llamette.kernels.int8 import compile_kernels
    from llamette.weight_types import BY_NAME
    kind = BY_NAME[sys.argv[1]]
    matrix = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    compile_kernels(kind.from_gguf(kind.quantize(matrix), matrix.shape), in_lanes=False)
    print(json.dumps(sorted(compiled)))
""")


@pytest.mark.skipif(not FUSED_MADD, reason="the lanes' tasks of a CPU with AVX-512 VNNI")
def test_a_second_k_quant_type_shares_the_lanes_multiplication_of_the_first(tmp_path):
    """A prompt's lanes multiply unpacked rows by code every weight type shares: after Q4_K's
    kernels (a scale per input group, minimums), Q6_K's (two scales per input group, none)
    compile their own unpacking (_quads_task), not the multiplication."""
    env = {**os.environ, "LLAMETTE_CACHE_DIR": str(tmp_path), SWITCH: "0"}

    def compiled_for(type_name: str) -> set[str]:
        done = subprocess.run([sys.executable, "-c", LANE_KERNELS, type_name], env=env,
                              check=True, capture_output=True, text=True, timeout=600)  # fmt: skip
        return set(json.loads(done.stdout))

    assert {"_quads_task", "_rows_times_quads"} <= compiled_for("q4_k")
    second = compiled_for("q6_k")
    assert "_quads_task" in second
    assert "_rows_times_quads" not in second


HELPER_RECORDING = RECORDING_COMPILES + textwrap.dedent("""
    from llamette.ahead import main
    main(sys.argv[1:])
    print(json.dumps(sorted(compiled)))
""")


@pytest.mark.skipif(not FUSED_MADD, reason="the lanes' tasks of a CPU with AVX-512 VNNI")
def test_a_helper_leaves_the_lane_kernels_every_type_shares_to_the_first_process(tmp_path):
    """A cold start of Q4_K weights but a Q6_K down projection: the helper compiles Q6_K's lane
    task calling the multiplication that every type shares by its symbol alone (the first process
    compiles it, with Q4_K's); the first process then loads that task and runs it, linked to its
    own multiplication: a long prompt's logits (in lanes) are those of a run compiled alone."""
    from llamette import Tokenizer
    from llamette.formats import load_weights
    from llamette.formats.gguf import write_gguf

    f32 = random_model_of_whole_k_blocks(tmp_path / "f32.gguf", n_layers=1)
    model = tmp_path / "q4_k.gguf"
    write_gguf(load_weights(f32), model, Tokenizer.load(BUNDLED / "tokenizer.bin"), "q4_k",
               tensor_types={"layers.0.feed_forward.w2.weight": "q6_k"})  # fmt: skip
    cache = str(tmp_path / "cache")
    env = {**os.environ, "LLAMETTE_CACHE_DIR": cache, SWITCH: "0"}
    helper = subprocess.run([sys.executable, "-c", HELPER_RECORDING, str(model), "f32", "fast",
                             "products"], env=env, stdin=subprocess.DEVNULL, check=True,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    compiled = set(json.loads(helper.stdout.splitlines()[-1]))
    assert "_quads_task" in compiled and "_rows_times_quads" not in compiled
    prompt = tuple(range(1, 41))  # 40 rows: 32 in lanes
    with_helpers = _logits(model, cache, env, prompt)
    alone = _logits(model, str(tmp_path / "alone"), env, prompt)
    np.testing.assert_array_equal(with_helpers, alone)


def _logits(model: Path, cache: str, env: dict, prompt: tuple = (1, 2, 3)) -> np.ndarray:
    script = ("import sys; from llamette import Transformer; "
              "print(Transformer.load(sys.argv[1]).prefill([int(t) for t in sys.argv[2:]], 0).tolist())")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script, str(model), *map(str, prompt)],
                          env={**env, "LLAMETTE_CACHE_DIR": cache}, check=True,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return np.array(json.loads(done.stdout), np.float32)
