"""The forward pass against Hugging Face transformers' logits for the same weights."""

import sys

import numpy as np
import pytest

from conftest import BUNDLED, llama_cpp_model, numpy_forward, shared_path
from llamette import LlametteError, Tokenizer, Transformer
from llamette.formats import read_model
from llamette.formats.gguf import write_gguf
from llamette.formats.llama2c import read_llama2c
from llamette.kernels import SMALL_BATCH
from llamette.model import lazily_mapped_zeros, release_pages
from llamette.weight_types import Q8Tensor


@pytest.mark.parametrize("exact", [True, False])
def test_logits_match_transformers(exact):
    """hf-mha.v0.bin is hf-mha/ exported by llama2.c; the npz holds LlamaForCausalLM's logits."""
    reference = np.load(shared_path("expected", "hf-mha.logits.npz"))
    model = Transformer.load(shared_path("models", "hf-mha.v0.bin"), exact=exact)
    for pos, token in enumerate(reference["input_ids"].ravel()):
        logits = model.forward(int(token), pos)
        expected = reference["logits"].reshape(-1, 32000)[pos]
        error = np.abs(logits - expected).max() / np.abs(expected).max()
        assert error < 1e-4, f"position {pos}: relative error {error:.2e}"


def test_the_numpy_reference_forward_gives_transformers_logits():
    """conftest.numpy_forward, which the GGUF tests compare llamette's forward with, checked
    against transformers itself."""
    reference = np.load(shared_path("expected", "hf-mha.logits.npz"))
    weights = read_llama2c(shared_path("models", "hf-mha.v0.bin"))
    tokens = reference["input_ids"].ravel().tolist()
    logits = numpy_forward(weights.config, dict(weights.tensors), tokens)
    expected = reference["logits"].reshape(-1, 32000)
    assert np.abs(logits - expected).max() < 1e-4 * np.abs(expected).max()


def test_default_path_on_partial_q8_groups_stays_close_to_fp32():
    """runq.c miscomputes stories260K_q80.bin; llamette's default path keeps it near the fp32 model."""
    fp32 = Transformer.load(shared_path("models", "stories260K.bin"), exact=True)
    q80 = Transformer.load(shared_path("models", "stories260K_q80.bin"))
    runq = Transformer.load(shared_path("models", "stories260K_q80.bin"), exact=True)
    token, errors, runq_errors = 1, [], []
    for pos in range(64):
        expected = fp32.forward(token, pos).copy()
        scale = np.abs(expected).max()
        errors.append(np.abs(q80.forward(token, pos) - expected).max() / scale)
        runq_errors.append(np.abs(runq.forward(token, pos) - expected).max() / scale)
        token = int(np.argmax(expected))
    assert max(errors) < 0.05
    assert max(runq_errors) > 0.2  # what runq.c's arithmetic does to this file


@pytest.mark.parametrize(
    "name", ["stories260K.bin", "rand-gqa.v0.bin", "rand-gqa.v2.bin", "stories260K_q80_gs8.bin"]
)
def test_batched_prefill_agrees_with_one_token_at_a_time(name):
    one_by_one = Transformer.load(shared_path("models", name))
    batched = Transformer.load(shared_path("models", name))
    tokens = [1, *np.random.default_rng(0).integers(3, one_by_one.config.vocab_size, 40).tolist()]
    for pos, token in enumerate(tokens):
        expected = one_by_one.forward(token, pos)
    logits = batched.prefill(tokens, 0)
    assert np.argmax(logits) == np.argmax(expected)
    if isinstance(one_by_one.weights.layer(0, "attention.wq.weight"), Q8Tensor):
        # a last-bit difference (here from the reordered attention sums, which depend on the CPU's
        # vector width) can flip the rounding of a quantized activation, which moves the values
        # it feeds by a quantization step: compare the whole, not each value
        assert np.abs(logits - expected).max() < 1e-2 * np.abs(expected).max()
        difference = np.linalg.norm(batched.kv_cache.keys - one_by_one.kv_cache.keys)
        assert difference < 1e-2 * np.linalg.norm(one_by_one.kv_cache.keys)
    else:
        assert np.abs(logits - expected).max() < 1e-5 * np.abs(expected).max()
        np.testing.assert_allclose(
            batched.kv_cache.keys, one_by_one.kv_cache.keys, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize(
    "name", ["rand-gqa.v0.bin", "rand-gqa.v2.bin", "stories260K_q80.bin", "stories260K.gguf"]
)
def test_exact_batches_give_the_logits_of_one_token_at_a_time_to_the_bit(name):
    """--exact holds in every call: a prompt's batch (prefill, the server's passes, perplexity)
    gets run.c's bits, runq.c's miscomputed partial groups included (stories260K_q80)."""
    path = shared_path("models", name)
    one_by_one, batched = Transformer.load(path, exact=True), Transformer.load(path, exact=True)
    tokens = [1, *np.random.default_rng(0).integers(3, one_by_one.config.vocab_size, 40).tolist()]
    expected = np.stack([one_by_one.forward(token, pos).copy() for pos, token in enumerate(tokens)])
    logits = batched.forward_batch(tokens, np.arange(len(tokens)), np.zeros(len(tokens), np.int64))
    np.testing.assert_array_equal(logits, expected)
    np.testing.assert_array_equal(batched.prefill(tokens, 0), expected[-1])
    np.testing.assert_array_equal(batched.kv_cache.keys, one_by_one.kv_cache.keys)


def test_forward_batch_decodes_several_sequences_at_once():
    """Three sequences in three cache slots, advanced together, match each run alone."""
    path = shared_path("models", "stories260K.bin")
    together = Transformer.load(path, n_slots=3)
    prompts = [[1, 403, 407], [1, 261, 378, 432, 383], [1, 286]]
    for slot, prompt in enumerate(prompts):
        together.prefill(prompt, 0, slot)
    nexts, positions = [9, 10, 11], [len(p) for p in prompts]
    logits = together.forward_batch(nexts, positions, [0, 1, 2])
    for slot, prompt in enumerate(prompts):
        alone = Transformer.load(path)
        alone.prefill(prompt, 0)
        expected = alone.forward(nexts[slot], positions[slot])
        np.testing.assert_allclose(
            logits[slot], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()
        )


@pytest.mark.parametrize("exact", [False, True])
def test_a_warmed_up_model_runs_as_a_fresh_one(exact):
    """warm_up's tokens in the cache are written over by the run that follows."""
    path = shared_path("models", "stories260K.bin")
    fresh, warmed = Transformer.load(path, exact=exact), Transformer.load(path, exact=exact)
    warmed.warm_up()
    tokens = [1, 403, 407, 261, 378]
    np.testing.assert_array_equal(warmed.prefill(tokens, 0), fresh.prefill(tokens, 0))
    np.testing.assert_array_equal(warmed.forward(9, 5), fresh.forward(9, 5))


def test_passes_reuse_the_memory_of_the_passes_before():
    """A pass's activations take the memory of the last one's (fresh pages fault at first
    touch), growing only for a larger batch; decode steps take it too."""
    model = Transformer.load(shared_path("models", "stories260K.bin"))
    model.forward_batch([1, 403, 407], [0, 1, 2], [0, 0, 0])
    buffers = model.buffers
    model.forward_batch([1, 403], [0, 1], [0, 0])
    model.forward(261, 2)
    assert model.buffers is buffers and buffers.capacity == 3
    model.forward_batch(list(range(1, 9)), list(range(8)), [0] * 8)
    assert model.buffers.capacity == 8


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_tokens_positions_and_slots_out_of_range_are_refused_before_they_are_run():
    model = Transformer.load(BUNDLED / "model.bin", n_slots=2)
    with pytest.raises(LlametteError, match="position 256 is outside the context of 256"):
        model.forward(1, 256)
    with pytest.raises(LlametteError, match="token 32000 is outside the vocabulary"):
        model.forward(32000, 0)
    with pytest.raises(LlametteError, match="slot 2 is outside the 2 KV cache slots"):
        model.forward_batch([1, 1], [0, 1], [0, 2])
    with pytest.raises(LlametteError, match="position -1 is outside"):
        model.prefill([1, 2], -1)
    assert model.kv_held.tolist() == [0, 0]  # nothing written


def test_the_kv_cache_takes_memory_only_where_written():
    """A 7B model's cache is 4 GiB at full context; a short chat should not make it resident."""
    cache = lazily_mapped_zeros((4, 2, 4096, 128))  # 4 layers x 2 kv heads: 2 MiB per run
    before = resident_kib()
    cache[:, :, 0] = 1.0  # the first position of every kv head
    assert resident_kib() - before < 1024  # 8 pages of 4 KiB, not 8 runs of 2 MiB
    assert not cache[:, :, 1:].any()
    cache[:, :, :2048] = 2.0  # 8 MiB
    written = resident_kib()
    release_pages(cache, 0, cache.nbytes)
    assert written - resident_kib() > 7 * 1024 and not cache.any()


def test_released_kv_positions_read_as_zeros_and_the_rest_stays():
    """kv_held counts each slot's positions written; release_positions gives back those from
    `keep` on (whole pages: 64 positions of the bundled model's heads are 2 pages)."""
    model = Transformer.load(BUNDLED / "model.bin", n_slots=3)
    model.forward_batch(list(range(1, 97)), list(range(96)), [1] * 96, [])
    model.forward(5, 0, slot=2)
    assert list(model.kv_held) == [0, 96, 1]
    keys, values = model.kv_cache.keys, model.kv_cache.values
    kept = keys[1, :, :, :64].copy()
    model.release_positions(1, keep=64)
    assert list(model.kv_held) == [0, 64, 1]
    assert (keys[1, :, :, :64] == kept).all() and not keys[1, :, :, 64:].any()
    assert keys[1, :, :, 63].any() and values[2, :, :, 0].any()
    model.copy_positions(1, 0, 64)
    model.release_positions(1)
    assert list(model.kv_held) == [64, 0, 1] and not keys[1].any() and not values[1].any()
    assert (keys[0, :, :, :64] == kept).all()


@pytest.mark.parametrize(("kv_type", "tolerance"), [("f16", 1e-3), ("q8_0", 2e-2)])
def test_a_smaller_kv_cache_keeps_logits_close_and_rows_invariant(kv_type, tolerance):
    """The bundled model over a prompt: logits with an F16 or Q8_0 cache within `tolerance`
    (relative) of the float32 cache's; a pass of the prompt's rows gets the bits of the rows
    fed one at a time, as with the float32 cache."""
    tokens = Tokenizer.load(BUNDLED / "tokenizer.bin").encode("Lily and Tom went to the park.")
    n = len(tokens)
    assert 8 < n <= SMALL_BATCH

    def model(kv_type: str) -> Transformer:
        return Transformer.load(BUNDLED / "model.bin", kv_type=kv_type)

    exact_cache = model("f32").forward_batch(tokens, list(range(n)), [0] * n)
    smaller = model(kv_type).forward_batch(tokens, list(range(n)), [0] * n)
    stepping = model(kv_type)
    one_by_one = np.array([stepping.forward(token, pos).copy() for pos, token in enumerate(tokens)])
    np.testing.assert_array_equal(smaller, one_by_one)
    error = np.linalg.norm(smaller - exact_cache) / np.linalg.norm(exact_cache)
    assert 0 < error < tolerance


def test_embeddings_point_where_llama_cpps_mean_pooling_does(tmp_path):
    path = tmp_path / "stories.gguf"
    tokenizer = Tokenizer.load(BUNDLED / "tokenizer.bin")
    write_gguf(read_model(BUNDLED / "model.bin"), path, tokenizer, "f32")
    mean_pooling = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN
    llama = llama_cpp_model(path, embedding=True, pooling_type=mean_pooling, n_ctx=256)
    model = Transformer.load(path)
    for text in ("Once upon a time there was a dog.", "Lily liked to play in the park."):
        ours, theirs = model.embedding(tokenizer.encode(text)), np.array(llama.embed(text))
        assert abs(np.linalg.norm(ours) - 1) < 1e-5
        assert ours @ theirs / np.linalg.norm(theirs) > 0.999
    other = model.embedding(tokenizer.encode("The sun was hot and the fox was sleepy."))
    assert ours @ other < 0.9  # texts apart point apart (0.41 to 0.50 here)
