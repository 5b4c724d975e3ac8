"""llamette.Llama stands in for llama_cpp.Llama: the same user code, run on the same GGUF through
both classes, gives the same greedy outputs."""

from pathlib import Path

import numpy as np
import pytest

import llamette
from conftest import llama_cpp_model
from llamette.formats import read_model
from llamette.formats.gguf import write_gguf
from llamette.tokenizer import Tokenizer

BUNDLED = Path(llamette.__file__).parent / "bundled"
TEMPLATE = (
    "{% for message in messages %}{{ bos_token }}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You tell stories."},
    {"role": "user", "content": "Tell me about a dog."},
]
TEXTS = ["Hello world", "  two  spaces", "Lily's café ☕ 42", "</s><s>inside", ""]
MEAN_POOLING = 1  # llama.cpp's LLAMA_POOLING_TYPE_MEAN


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    """The bundled model as an F32 GGUF with its tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("gguf") / "stories.gguf"
    tokenizer = Tokenizer.load(BUNDLED / "tokenizer.bin")
    write_gguf(read_model(BUNDLED / "model.bin"), path, tokenizer, "f32", chat_template=TEMPLATE)
    return path


def common_usage(Llama, model_path: Path) -> dict:
    """What applications do with llama-cpp-python's Llama, written once for either class."""
    llm = Llama(model_path=str(model_path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    out = {"sizes": (llm.n_ctx(), llm.n_vocab(), llm.token_bos(), llm.token_eos())}
    out["completion"] = llm("Once upon a time", max_tokens=40, temperature=0.0)
    out["streamed"] = list(
        llm.create_completion("Once upon a time", max_tokens=40, temperature=0.0, stream=True)
    )
    out["stopped"] = llm("Once upon a time", max_tokens=60, temperature=0, stop=[".", "!"])
    out["long"] = llm("Lily and Tom", max_tokens=None, temperature=0)  # to the context's end
    out["logprobs"] = llm("Once upon a time", max_tokens=12, temperature=0, logprobs=3)
    out["chat"] = llm.create_chat_completion(MESSAGES, temperature=0.0, max_tokens=60)
    out["streamed_chat"] = list(
        llm.create_chat_completion(MESSAGES, temperature=0.0, max_tokens=60, stream=True)
    )
    out["tokens"] = [llm.tokenize(text.encode()) for text in TEXTS]
    out["special_tokens"] = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS]
    out["text"] = [llm.detokenize(tokens) for tokens in out["tokens"]]
    out["seeded"] = [
        llm("Once upon a time", max_tokens=24, temperature=1.0, seed=seed)["choices"][0]["text"]
        for seed in (7, 7, 8)
    ]
    embedder = Llama(str(model_path), n_ctx=256, embedding=True, pooling_type=MEAN_POOLING,
                     verbose=False)  # fmt: skip
    out["embedding"] = embedder.create_embedding(["A dog ran.", "The sun was hot."])
    return out


@pytest.fixture(scope="module")
def theirs(gguf) -> dict:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test dependency")

    def llama_cpp_llama(model_path, verbose=True, **options):  # its Llama, AMX tiles aside
        return llama_cpp_model(Path(model_path), **options)

    return common_usage(llama_cpp_llama, gguf)


@pytest.fixture(scope="module")
def ours(gguf) -> dict:
    return common_usage(llamette.Llama, gguf)


def text_of(response: dict) -> str:
    choice = response["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" if "delta" in c["choices"][0]
        else c["choices"][0]["text"]
        for c in chunks
    )  # fmt: skip


def test_sizes_and_special_tokens(ours, theirs):
    assert ours["sizes"] == theirs["sizes"]


@pytest.mark.parametrize("call", ["completion", "stopped", "long", "chat"])
def test_greedy_answers_equal_llama_cpps(ours, theirs, call):
    assert text_of(ours[call]) == text_of(theirs[call]) and text_of(ours[call])
    for key in ("object", "model"):
        assert ours[call][key] == theirs[call][key]
    assert ours[call]["usage"] == theirs[call]["usage"]
    assert ours[call]["choices"][0]["finish_reason"] == theirs[call]["choices"][0]["finish_reason"]


@pytest.mark.parametrize("call", ["streamed", "streamed_chat"])
def test_streams_hold_the_answer_in_chunks(ours, theirs, call):
    whole = "completion" if call == "streamed" else "chat"
    assert streamed_text(ours[call]) == text_of(ours[whole]) == streamed_text(theirs[call])
    assert len(ours[call]) > 10 and {c["object"] for c in ours[call]} == {
        c["object"] for c in theirs[call]
    }
    assert ours[call][-1]["choices"][0]["finish_reason"] == "length"


def test_tokenize_and_detokenize_equal_llama_cpps(ours, theirs):
    assert ours["tokens"] == theirs["tokens"]
    assert ours["special_tokens"] == theirs["special_tokens"]
    assert ours["text"] == theirs["text"]


def test_logprobs_equal_llama_cpps(ours, theirs):
    mine, llama_cpps = (answer["logprobs"]["choices"][0]["logprobs"] for answer in (ours, theirs))
    assert (
        mine["tokens"] == llama_cpps["tokens"] and mine["text_offset"] == llama_cpps["text_offset"]
    )
    assert np.allclose(mine["token_logprobs"], llama_cpps["token_logprobs"], atol=1e-3)
    for top, their_top in zip(mine["top_logprobs"], llama_cpps["top_logprobs"], strict=True):
        assert top.keys() == their_top.keys()
        assert np.allclose([top[k] for k in top], [their_top[k] for k in top], rtol=1e-3, atol=1e-3)


def test_echo_gives_the_prompts_tokens_their_logprobs_too(gguf):
    """One entry per prompt token, BOS included, the first without a log-probability
    (llama-cpp-python leaves BOS out and gives the next token none)."""
    llm = llamette.Llama(str(gguf), verbose=False)
    prompt = llm.tokenize(b"Once upon a time")
    answer = llm("Once upon a time", max_tokens=5, temperature=0, logprobs=1, echo=True)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith("Once upon a time")
    assert len(logprobs["tokens"]) == len(prompt) + 5 == len(logprobs["text_offset"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(p < 0 for p in logprobs["token_logprobs"][1:])
    for word, offset in zip(logprobs["tokens"][2:], logprobs["text_offset"][2:], strict=True):
        assert choice["text"][offset:].startswith(word)
    streamed = list(llm("Once upon a time", max_tokens=5, temperature=0, logprobs=1, echo=True,
                        stream=True))  # fmt: skip
    assert "".join(c["choices"][0]["text"] for c in streamed) == choice["text"]
    assert sum(
        len(c["choices"][0]["logprobs"]["tokens"]) for c in streamed if c["choices"][0]["logprobs"]
    ) == len(logprobs["tokens"])


def test_chat_logprobs_list_the_answers_tokens(gguf):
    llm = llamette.Llama(str(gguf), verbose=False)
    answer = llm.create_chat_completion(MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                        top_logprobs=2)  # fmt: skip
    content = answer["choices"][0]["logprobs"]["content"]
    assert (
        "".join(entry["token"] for entry in content) == answer["choices"][0]["message"]["content"]
    )
    for entry in content:  # greedy: the token drawn is the likeliest
        assert (
            len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
        )
        assert entry["bytes"] == list(entry["token"].encode())


def test_a_seed_reproduces_its_sample(ours, theirs):
    for seeded in (ours["seeded"], theirs["seeded"]):
        assert seeded[0] == seeded[1] != seeded[2]


def test_embeddings_point_where_llama_cpps_do(ours, theirs):
    assert ours["embedding"]["usage"] == theirs["embedding"]["usage"]
    for mine, llama_cpps in zip(
        ours["embedding"]["data"], theirs["embedding"]["data"], strict=True
    ):
        a, b = np.array(mine["embedding"]), np.array(llama_cpps["embedding"])
        assert abs(np.linalg.norm(a) - 1) < 1e-5
        assert a @ b / np.linalg.norm(b) > 0.999


def test_embed_without_normalize_is_the_mean(gguf):
    llm = llamette.Llama(str(gguf), verbose=False)
    unit, mean = llm.embed("A dog ran.", normalize=True), llm.embed("A dog ran.")
    assert np.allclose(np.array(mean) / np.linalg.norm(mean), unit, atol=1e-6)


@pytest.mark.parametrize(
    "call, problem",
    [
        (lambda llm: llm("x", temperature=-1), "temperature"),
        (lambda llm: llm("x", top_p=2), "top_p"),
        (lambda llm: llm("x", min_p=-0.1), "min_p"),
        (lambda llm: llm("x", repeat_penalty=0), "repeat_penalty"),
        (lambda llm: llm("x", logit_bias={99999: 1.0}), "logit_bias"),
        (lambda llm: llm("x", stop=[1, 2]), "stop"),
        (lambda llm: llm("x", mirostat_mode=2), "mirostat_mode"),
        (lambda llm: llm("x", suffix="y"), "suffix"),
        (lambda llm: llm("x " * 300), "prompt"),
        (lambda llm: llm([5, 99999]), "tokens"),
        (lambda llm: llm.create_chat_completion([{"role": "robot", "content": "x"}]), "role"),
        (lambda llm: llm.create_chat_completion([]), "messages"),
        (lambda llm: llm.create_chat_completion(MESSAGES, tools=[{}]), "tools"),
        (lambda llm: llm("x", logprobs=21), "logprobs"),
        (lambda llm: llm("x", stop_token_ids=[-1]), "stop_token_ids"),
        (lambda llm: llm.create_chat_completion(MESSAGES, top_logprobs=2), "top_logprobs"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(gguf, call, problem):
    llm = llamette.Llama(str(gguf), verbose=False)
    with pytest.raises(ValueError, match=problem):
        call(llm)


def test_logit_bias_takes_ids_as_numbers_or_strings(gguf):
    llm = llamette.Llama(str(gguf), verbose=False)
    token = llm.tokenize(b" dog", add_bos=False)[-1]
    for bias in ({token: 100.0}, {str(token): 100}):
        answer = llm("Once upon a time", max_tokens=3, temperature=0, logit_bias=bias)
        assert answer["choices"][0]["text"] == llm.detokenize([token] * 3).decode()


def test_options_for_llama_cpps_machinery_are_accepted_and_others_refused(gguf):
    llamette.Llama(str(gguf), n_gpu_layers=-1, n_batch=64, use_mmap=False, verbose=False)
    with pytest.raises(TypeError, match="n_gpu_layer"):
        llamette.Llama(str(gguf), n_gpu_layer=-1)


def test_type_k_and_type_v_choose_the_kv_cache_type(gguf):
    """ggml's type numbers, as llama-cpp-python takes them: 1 is F16, 8 is Q8_0."""
    answers = {}
    for number, dtype in ((None, np.float32), (1, np.uint16), (8, np.int8)):
        llm = llamette.Llama(str(gguf), type_k=number, type_v=number, verbose=False)
        assert llm.model.kv_cache.keys.dtype == dtype
        answers[number] = text_of(llm("Once upon a time", max_tokens=8, temperature=0))
    assert answers[None] == answers[1]  # halves of the keys change no greedy token here
    with pytest.raises(ValueError, match="type_k: 2 is not a KV-cache type llamette has"):
        llamette.Llama(str(gguf), type_k=2, verbose=False)
    with pytest.raises(ValueError, match="type_v: must be type_k"):
        llamette.Llama(str(gguf), type_k=1, type_v=8, verbose=False)


def test_a_stream_left_early_frees_its_slot(gguf):
    llm = llamette.Llama(str(gguf), verbose=False)
    chunks = llm("Once upon a time", max_tokens=50, temperature=0, stream=True)
    next(chunks), next(chunks)
    chunks.close()
    assert llm.engine.idle()
    assert text_of(llm("Once upon a time", max_tokens=5, temperature=0))
