"""Shared fixtures: the reference data in ../shared (tests that need it skip without it)."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llamette.formats.gguf import write_gguf
from llamette.tokenizer import (
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    BPETokenizer,
    SpecialTokens,
)
from llamette.training.corpus import make_corpus
from llamette.weights import ModelConfig, Weights

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "llamette" / "bundled"  # the packaged model
SHARED = Path(
    os.environ.get("LLAMETTE_SHARED", Path(__file__).resolve().parents[1].parent / "shared")
)


# The start of a script that records the names of the functions it compiles in `compiled`.
RECORDING_COMPILES = textwrap.dedent("""
    import json, sys
    from numba.core import event
    compiled = set()

    class Names(event.Listener):
        def on_start(self, e):
            compiled.add(e.data["dispatcher"].py_func.__name__)
        def on_end(self, e):
            pass

    event.register("numba:compile", Names())
""")

# A first run in a fresh process (a prompt's pass, a draw), printing the names of the functions it
# compiled: a JSON list, sorted.
FIRST_DRAW = RECORDING_COMPILES + textwrap.dedent("""
    from llamette import Sampler, Transformer
    model = Transformer.load(sys.argv[1])
    logits = model.prefill([1, 2, 3], 0)
    Sampler(model.config.vocab_size, temperature=1.0, topp=0.9, seed=1).sample(logits)
    print(json.dumps(sorted(compiled)))
""")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip when the reference data is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared reference data beside the project)")
    return path


def read_jsonl(*parts: str) -> list[dict]:
    with open(shared_path(*parts)) as f:
        return [json.loads(line) for line in f]


def expected_rows(name: str, keep=lambda row: True) -> list:
    """Rows of ../shared/expected/<name> for parametrize, ids from their "case" or position.

    Without the shared data: one skipped parameter that says why.
    """
    path = SHARED / "expected" / name
    if not path.exists():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"needs {path}"))]
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [
        pytest.param(row, id=row.get("case", str(i))) for i, row in enumerate(rows) if keep(row)
    ]


@pytest.fixture
def models() -> Path:
    return shared_path("models")


@contextlib.contextmanager
def serving(served):
    """`llamette serve` for a ServedModel on a free port of 127.0.0.1, on a thread; yields its
    base URL once the model is ready."""
    import uvicorn

    from llamette.server import create_app, listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    served.engine.ready.wait()  # until then every request gets 503 (test_server tests that)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


def tiny_llama(n_kv_heads: int, tied: bool, seed: int, **settings):
    """A random transformers LlamaForCausalLM small enough to build in a test (skips without
    torch and transformers, the test extra's references); `settings` change its LlamaConfig."""
    torch = pytest.importorskip(
        "torch", reason="torch is a test dependency (pip install -e .[test])"
    )
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **{
            "vocab_size": 320,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 8,
            "num_key_value_heads": n_kv_heads,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": tied,
        }
        | settings
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1.0, so that a swapped norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.3 * torch.randn_like(parameter))
    return model


def transformers_logits(model, tokens: list[int]) -> np.ndarray:
    """A transformers model's float32 logits (len(tokens), vocab) for one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


# Weights and inputs for the kernel and weight type tests, and runq.c's arithmetic in NumPy.

_rng = np.random.default_rng(0)


def randn(*shape) -> np.ndarray:
    """float32 values drawn from N(0, 1), from one seeded stream."""
    return _rng.standard_normal(shape).astype(np.float32)


def kv_cache_of(keys: np.ndarray, values: np.ndarray, kv_type: str):
    """(a KVCache of float32 keys and values (..., head_size) in kv_type, the float32 keys and
    values it holds): stored and read back by NumPy (F16) and gguf-py (Q8_0: its blocks' int8
    values, its float16 scales widened to float32)."""
    from llamette.kernels.kv_cache import KVCache

    def stored(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        no_scales = np.zeros((*x.shape[:-1], 0), np.float32)
        if kv_type == "f16":
            halves = x.astype(np.float16)
            return halves.view(np.uint16), no_scales, halves.astype(np.float32)
        if kv_type == "q8_0":
            gguf = pytest.importorskip("gguf")
            q8_0 = gguf.GGMLQuantizationType.Q8_0
            blocks = gguf.quants.quantize(x.reshape(-1, 32), q8_0)
            scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)
            quants = blocks[:, 2:].copy().view(np.int8)
            held = gguf.quants.dequantize(blocks, q8_0).reshape(x.shape).astype(np.float32)
            return quants.reshape(x.shape), scales.reshape(*x.shape[:-1], -1), held
        return x, no_scales, x

    (k, k_scales, k_held), (v, v_scales, v_held) = stored(keys), stored(values)
    return KVCache(k, v, k_scales, v_scales), k_held, v_held


def runq_quantize(x, group_size):
    """runq.c's quantize in NumPy: float32 scale and quotient, C round (halves away from zero)."""
    groups = x[: len(x) // group_size * group_size].reshape(-1, group_size)
    scales = (np.abs(groups).max(axis=1) / np.float32(127)).astype(np.float32)
    quotient = (groups / scales[:, None]).astype(np.float64)  # C's round() takes a double
    return (np.sign(quotient) * np.floor(np.abs(quotient) + 0.5)).astype(np.int8).ravel(), scales


def runq_matmul(xq, xs, wq, ws, group_size):
    """runq.c's matmul in NumPy: group dot products in integers, float32 sums in group order,
    weight scales read over the matrix flattened, trailing columns of a row skipped."""
    d, n = wq.shape
    out = np.zeros(d, np.float32)
    for j in range(0, n - group_size + 1, group_size):
        ival = wq[:, j : j + group_size].astype(np.int32) @ xq[j : j + group_size].astype(np.int32)
        w_scale = ws[(np.arange(d) * n + j) // group_size]
        out = out + (ival.astype(np.float32) * w_scale) * xs[j // group_size]
    return out


def rounded_to_8_bits(x: np.ndarray, group_size: int = 32) -> np.ndarray:
    """x (B, n) rounded as runq.c and llama.cpp round a product's input for int8 weights, in
    float64: groups of 32 values (256 for llama.cpp's K-quants), scale max|x| / 127 and quotient
    x / scale in float32, nearest integer (halves away from zero)."""
    groups = x.reshape(len(x), x.shape[1] // group_size, group_size).astype(np.float32)
    scales = (np.abs(groups).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.nan_to_num(groups / scales).astype(np.float64)
    return (np.sign(q) * np.floor(np.abs(q) + 0.5) * scales).reshape(x.shape)


def numpy_forward(config, tensors: dict, tokens: list[int], quantized_inputs=frozenset()):
    """Logits (len(tokens), vocab_size) of a Llama forward pass in float64 NumPy, written from
    the paper's steps (RMSNorm, RoPE on pairs within each head, grouped-query causal attention,
    SwiGLU) over float tensors by Meta's names: an independent reference for llamette's forward.

    Inputs to the matrices named in quantized_inputs are rounded first (rounded_to_8_bits), as
    for Q8_0, Q4_0 and Q4_1 weights.
    """
    c, t = config, {name: np.asarray(value, np.float64) for name, value in tensors.items()}
    n, hs = len(tokens), config.head_size

    def linear(name, x):
        return (rounded_to_8_bits(x) if name in quantized_inputs else x) @ t[name].T

    def rmsnorm(x, weight):
        return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c.norm_eps)

    def rope(
        x, heads
    ):  # x (n, heads * hs): pair (2j, 2j + 1) of a head turns by pos * theta^(-2j / hs)
        angles = np.arange(n)[:, None] * c.rope_theta ** (-np.arange(0, hs, 2) / hs)[None, :]
        pairs = x.reshape(n, heads, hs // 2, 2)
        turned = (pairs[..., 0] + 1j * pairs[..., 1]) * np.exp(1j * angles)[:, None, :]
        return np.stack([turned.real, turned.imag], axis=-1).reshape(n, heads * hs)

    x = t["tok_embeddings.weight"][tokens]
    causal = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(c.n_layers):
        p = f"layers.{layer}."
        xb = rmsnorm(x, t[p + "attention_norm.weight"])
        q = rope(linear(p + "attention.wq.weight", xb), c.n_heads).reshape(n, c.n_heads, hs)
        k = rope(linear(p + "attention.wk.weight", xb), c.n_kv_heads).reshape(n, c.n_kv_heads, hs)
        v = linear(p + "attention.wv.weight", xb).reshape(n, c.n_kv_heads, hs)
        group = c.n_heads // c.n_kv_heads  # query heads per kv head, consecutive
        scores = np.einsum("qhd,khd->hqk", q, np.repeat(k, group, axis=1)) / np.sqrt(hs) + causal
        weights = np.exp(scores - scores.max(axis=2, keepdims=True))
        weights /= weights.sum(axis=2, keepdims=True)
        attended = np.einsum("hqk,khd->qhd", weights, np.repeat(v, group, axis=1)).reshape(n, -1)
        x = x + linear(p + "attention.wo.weight", attended)
        xb = rmsnorm(x, t[p + "ffn_norm.weight"])
        gate, up = (
            linear(p + "feed_forward.w1.weight", xb),
            linear(p + "feed_forward.w3.weight", xb),
        )
        x = x + linear(p + "feed_forward.w2.weight", gate / (1 + np.exp(-gate)) * up)
    classifier = "output.weight" if "output.weight" in t else "tok_embeddings.weight"
    return linear(classifier, rmsnorm(x, t["norm.weight"]))


def llama_cpp_model(path: Path, **options):
    """llama.cpp's Llama (llama-cpp-python) for a model file, on its plain CPU path: without its
    extra weight buffers (AMX tiles, repacked layouts), whose AMX kernels crash on CPUs with
    AMX-INT8 (a segfault in decode; ggml-org/llama.cpp#20824)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    library = llama_cpp.llama_cpp
    default_params = library.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    library.llama_model_default_params = without_extra_buffers  # Llama() has no option for it
    try:
        return llama_cpp.Llama(str(path), verbose=False, **options)
    finally:
        library.llama_model_default_params = default_params


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(tokens), vocab) for one sequence."""
    llama = llama_cpp_model(path, n_ctx=512, n_threads=2, logits_all=True)
    llama.eval(tokens)
    return np.array(llama.scores[: len(tokens)], np.float64)


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)), in nats."""

    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    p, q = log_softmax(reference_logits), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(axis=-1).mean())


def quantized_by_llama_cpp(source: Path, out: Path, file_type: str, pure: bool = False) -> Path:
    """source (an F32 GGUF) quantized by llama.cpp's own quantizer into llama.cpp's file type
    (its mix of types per tensor, and its fallbacks for rows that are not whole blocks); with
    `pure`, every matrix in the file type's main type."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.pure = pure
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return out


def random_model_of_whole_k_blocks(path: Path, n_layers: int = 3) -> Path:
    """An F32 GGUF of random weights whose rows are multiples of 256 values, so that llama.cpp's
    K-quant file types hold K-quant matrices (the trained test models fall back to other types)."""
    from llamette import Tokenizer

    config = ModelConfig(dim=256, hidden_dim=768, n_layers=n_layers, n_heads=4, n_kv_heads=2,
                         vocab_size=1024, seq_len=512, shared_classifier=False)  # fmt: skip
    rng = np.random.default_rng(7)
    tensors = {}
    for name, shape in config.tensor_shapes().items():
        if len(shape) == 1:  # norms away from 1
            tensors[name] = (1 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
        else:  # a stable residual stream: rounding errors do not grow through the layers
            tensors[name] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    tensors["tok_embeddings.weight"] *= np.sqrt(config.dim)
    tensors["output.weight"] *= 1.5  # peaked next-token distributions
    write_gguf(Weights(config, tensors), path, Tokenizer.load(BUNDLED / "tokenizer.bin"))
    return path


@pytest.fixture(scope="session")
def model_of_whole_k_blocks(tmp_path_factory) -> Path:
    """random_model_of_whole_k_blocks, three layers."""
    return random_model_of_whole_k_blocks(
        tmp_path_factory.mktemp("k_blocks") / "random256.f32.gguf"
    )


# Byte-level BPE tokenizers and models that carry them (tests of tokenizers, chat and serving)

# ChatML, as SmolLM2's instruct models write conversations
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONTROL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>",
                  "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]  # fmt: skip
USER_DEFINED_TOKENS = ["<tool_call>"]
# whole words in the vocabulary that no merge makes: where a pre-type ignores merges (Llama 3,
# tekken) a pre-token spelled as one is that token, elsewhere it is merged from its characters
WORDS_WITHOUT_MERGES = ["\u0120xylophone", "\u0120quokka", "Zebra"]
OTHER_SCRIPTS = [
    "Tiếng Việt có dấu: người, nước, đường, những điều tốt đẹp.",
    "日本語のテキストと漢字、カタカナ。中文文本也在这里，还有标点符号！",
    "Emoji: 🦙🔥 👩‍👩‍👧 🇫🇷 ❤️ ✨",
    "def f(x):\n\tif x >= 10:\n\t\treturn x ** 2  # square\n    return [i for i in range(x)]",
    "Numbers: 1 12 123 1234 12345 3.14159 -42 1,000,000 2026-12-03",
    "Don't you'll I'm we've they're he'd SHE'LL IT'S",
    "   leading spaces, trailing spaces   \n\n\r\n  \t tabs\tand\nnewlines \n",
    "Ünïcödé ßtraße Ελληνικά Русский текст עברית العربية हिन्दी",
]


def training_text() -> list[str]:
    return make_corpus(300, seed=7) + OTHER_SCRIPTS * 20


def train_bpe(pre: str) -> dict:
    """A byte-level BPE vocabulary of about 1,500 tokens trained with the pre-type's splits."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, trainers

    splits = [pre_tokenizers.Split(Regex(p), "isolated") for p in PRE_TOKENIZERS[pre].splits]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trained = tokenizers.Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    trainer = trainers.BpeTrainer(
        vocab_size=1500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(training_text(), trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "merges": merges}


def bpe_tokenizer(pre: str) -> BPETokenizer:
    trained = train_bpe(pre)
    normal = trained["tokens"] + [w for w in WORDS_WITHOUT_MERGES if w not in trained["tokens"]]
    tokens = normal + CONTROL_TOKENS + USER_DEFINED_TOKENS
    types = [NORMAL] * len(normal) + [CONTROL] * len(CONTROL_TOKENS) + [USER_DEFINED]
    ids = {t: i for i, t in enumerate(tokens)}
    specials = {"tokenizer.ggml.bos_token_id": ids["<|begin_of_text|>"],
                "tokenizer.ggml.eos_token_id": ids["<|end_of_text|>"]}  # fmt: skip
    add_bos = PRE_TOKENIZERS[pre].add_bos
    return BPETokenizer(
        tokens, types, trained["merges"], pre,
        SpecialTokens.from_gguf(lambda key, default=None: specials.get(key, default), tokens, types, add_bos),
    )  # fmt: skip


def write_bpe_model(path, tokenizer: BPETokenizer, chat_template: str | None = None,
                    always: str | None = None):  # fmt: skip
    """A small random model (F32 GGUF) with a BPE tokenizer; with `always`, one whose greedy
    choice is always that token: its layers add nothing, every embedding's first value is 1 and
    only that token's classifier row reads it."""
    config = ModelConfig(dim=64, hidden_dim=128, n_layers=1, n_heads=4, n_kv_heads=2,
                         vocab_size=tokenizer.vocab_size, seq_len=256, shared_classifier=always is None)  # fmt: skip
    rng = np.random.default_rng(0)
    tensors = {
        n: rng.standard_normal(s).astype(np.float32) * 0.1
        for n, s in config.tensor_shapes().items()
    }
    if always is not None:
        for name in tensors:
            if name.endswith(("wo.weight", "w2.weight")):
                tensors[name][:] = 0
        tensors["tok_embeddings.weight"][:, 0] = 1.0
        tensors["norm.weight"][:] = 1.0
        tensors["output.weight"][:, 0] = 0.0
        tensors["output.weight"][tokenizer.tokens.index(always), 0] = 10.0
    write_gguf(Weights(config, tensors), path, tokenizer, "f32", chat_template)
    return path
