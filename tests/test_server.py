"""`llamette serve` through the official openai client (and raw HTTP for malformed requests)."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

import llamette
from conftest import CHATML, bpe_tokenizer, serving, write_bpe_model
from llamette.server import ServedModel

httpx = pytest.importorskip("httpx", reason="httpx is a test dependency (pip install -e .[test])")
openai = pytest.importorskip("openai", reason="openai is a test dependency")

BUNDLED = Path(llamette.__file__).parent / "bundled"
NAME = "stories"


@pytest.fixture(scope="module")
def url():
    with serving(ServedModel.load(str(BUNDLED / "model.bin"), max_batch=16, name=NAME)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def recorded() -> dict:
    """PyTorch's greedy continuation, recorded when the bundled model was trained."""
    with open(BUNDLED / "train-log.json") as f:
        return json.load(f)["greedy"]


@pytest.fixture(scope="module")
def sp() -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(BUNDLED / "tokenizer.model"))


def test_lists_the_model_and_reports_health(client, url):
    assert [model.id for model in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["slots"] == 16


def test_greedy_completion_is_pytorchs_continuation(client, recorded, sp):
    n = 60
    completion = client.completions.create(
        model=NAME, prompt=recorded["prompt"], max_tokens=n, temperature=0
    )
    choice = completion.choices[0]
    expected = sp.decode(recorded["prompt_ids"][1:] + recorded["ids"][:n])
    assert recorded["prompt"] + choice.text == expected
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(recorded["prompt_ids"])
    assert completion.usage.completion_tokens == n
    assert completion.usage.total_tokens == len(recorded["prompt_ids"]) + n


def test_streamed_completion_equals_the_whole_one(client):
    request = dict(model=NAME, prompt="Lily saw a dog", max_tokens=50, temperature=0.9, seed=4)
    whole = client.completions.create(**request)
    chunks = list(client.completions.create(
        **request, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert len(chunks) > 10
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_whole_and_streamed(client, sp):
    messages = [
        {"role": "system", "content": "You tell short stories."},
        {"role": "user", "content": "Tell me about a cat."},
    ]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=40, seed=9)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content and not answer.content.startswith(" ")
    prompt = "[INST] <<SYS>>\nYou tell short stories.\n<</SYS>>\n\nTell me about a cat. [/INST]"
    assert whole.usage.prompt_tokens == 1 + len(sp.encode(prompt))
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=40, seed=9, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    newer = client.chat.completions.create(model=NAME, messages=messages, seed=9,
                                           max_completion_tokens=40)  # fmt: skip
    assert newer.choices[0].message.content == answer.content


def test_stop_strings(client):
    request = dict(model=NAME, prompt="Once upon a time", max_tokens=60, temperature=0)
    text = client.completions.create(**request).choices[0].text
    word = text.split()[5]
    stopped = client.completions.create(**request, stop=["zzz", word]).choices[0]
    assert stopped.text == text[: text.index(word)] and stopped.finish_reason == "stop"


REQUESTS = [
    dict(prompt="Once upon a time", temperature=0, max_tokens=80),
    dict(prompt="Ben had a big red truck", temperature=0.8, seed=3, max_tokens=60),
    dict(prompt="The sun was hot", temperature=1.0, top_p=0.9, seed=17, max_tokens=70),
    dict(
        prompt="Mia and her mom",
        temperature=1.1,
        seed=5,
        max_tokens=50,
        stop=["."],
        extra_body={"top_k": 10},
    ),  # top-k: not OpenAI's, llama.cpp's and llamette's
]


def stream_text(client, request: dict) -> tuple[str, str]:
    chunks = client.completions.create(model=NAME, stream=True, **request)
    pieces, finish = [], None
    for chunk in chunks:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(pieces), finish


def test_sixteen_concurrent_streams_equal_the_same_requests_one_at_a_time(client):
    requests = [{**REQUESTS[i % 4], "seed": REQUESTS[i % 4].get("seed", 1) + i} for i in range(16)]
    alone = [stream_text(client, request) for request in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda request: stream_text(client, request), requests))
    assert together == alone
    assert all(text for text, _ in alone)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(client, url):
    request = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    assert client.completions.create(**request).usage.completion_tokens > 100
    before = httpx.get(f"{url}/health").json()["cancelled"]
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**request, "stream": True}
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{url}/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health["running"] == 0 and health["cancelled"] == before + 1
    assert client.completions.create(**request).usage.completion_tokens > 100  # still serving


BAD_REQUESTS = [  # (path, body, status, what the message names)
    ("/v1/completions", b'{"model": "stories", "prompt": "Hi",', 400, "JSON"),
    ("/v1/completions", b'["model"]', 400, "object"),
    ("/v1/completions", {"prompt": "Hi"}, 400, "model"),
    ("/v1/completions", {"model": NAME}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": 7}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "min_p": 2}, 400, "min_p"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "logit_bias": {"a": 1}}, 400, "logit_bias"),
    (
        "/v1/completions",
        {"model": NAME, "prompt": "Hi", "logit_bias": {"--5": 1}},
        400,
        "logit_bias",
    ),
    (
        "/v1/completions",
        {"model": NAME, "prompt": "Hi", "logit_bias": {"\u00b2": 1}},
        400,
        "logit_bias",
    ),
    (
        "/v1/completions",
        b'{"model": "stories", "prompt": "Hi", "temperature": 1e400}',
        400,
        "temperature",
    ),
    (
        "/v1/completions",
        b'{"model": "stories", "prompt": "Hi", "top_p": %d}' % 10**400,
        400,
        "top_p",
    ),
    (
        "/v1/completions",
        {"model": NAME, "prompt": "Hi", "logit_bias": {"5": 500}},
        400,
        "logit_bias",
    ),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "repeat_last_n": -2}, 400, "repeat_last_n"),
    (
        "/v1/completions",
        {"model": NAME, "prompt": "Hi", "frequency_penalty": 3},
        400,
        "frequency_penalty",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "repeat_penalty": 0},
        400,
        "repeat_penalty",
    ),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "n": 0}, 400, "n"),
    (
        "/v1/completions",
        {"model": NAME, "prompt": "Hi", "stop_token_ids": [5000]},
        400,
        "stop_token_ids",
    ),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "logprobs": True}, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "Hi", "echo": 1}, 400, "echo"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 3},
        400,
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "Hi"}],
            "logprobs": True,
            "top_logprobs": -1,
        },
        400,
        "top_logprobs",
    ),  # fmt: skip
    ("/v1/completions", {"model": NAME, "prompt": "a story " * 300}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "Hi"}, 404, "gpt-4"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "role",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": 3}]},
        400,
        "content",
    ),  # fmt: skip
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "assistant", "content": "x"}]},
        400,
        "user",
    ),  # fmt: skip
    ("/v1/images/generations", {"model": NAME, "prompt": "Hi"}, 404, "/v1/images/generations"),
    ("/v1/embeddings", {"model": NAME, "input": []}, 400, "input"),
    (
        "/v1/embeddings",
        {"model": NAME, "input": "Hi", "encoding_format": "hex"},
        400,
        "encoding_format",
    ),
]


@pytest.mark.parametrize("path, body, status, named", BAD_REQUESTS)
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(client, url, path, body,
                                                                       status, named):  # fmt: skip
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}{path}", content=content,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == status
    error = response.json()["error"]
    assert named in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    still = client.completions.create(model=NAME, prompt="Once", max_tokens=3, temperature=0)
    assert still.usage.completion_tokens == 3


def test_the_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="Hi")
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=10_000
        )


def test_requests_beyond_the_queue_get_429():
    served = ServedModel.load(str(BUNDLED / "model.bin"), max_batch=1, max_queue=1, name=NAME)
    request = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0}
    with serving(served) as url, httpx.Client(base_url=url) as http:
        with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as running:
            first = running.iter_lines()
            next(first)  # decoding now
            with http.stream("POST", "/v1/completions", json={**request, "stream": True}) as queued:
                refused = httpx.post(f"{url}/v1/completions", json=request)
                assert refused.status_code == 429
                assert refused.json()["error"]["type"] == "rate_limit_error"
                assert list(queued.iter_lines())[-2:] == ["data: [DONE]", ""]
        assert http.post("/v1/completions", json=request).status_code == 200


def test_a_bpe_model_stops_at_its_end_of_turn_token(tmp_path):
    """Completions and chat end on the file's end-of-generation ids, and print none of them."""
    path = write_bpe_model(tmp_path / "chatml.gguf", bpe_tokenizer("smollm"), CHATML, "<|im_end|>")
    served = ServedModel.load(str(path), max_batch=2, name=NAME)
    with serving(served) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chat = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "<|im_end|>hi"}], max_tokens=20
        )
        completion = client.completions.create(model=NAME, prompt="Once", max_tokens=20)
    assert chat.choices[0].finish_reason == "stop" and chat.choices[0].message.content == ""
    assert completion.choices[0].finish_reason == "stop" and completion.choices[0].text == ""
    assert chat.usage.completion_tokens == 0  # the end token is not part of the answer


def test_any_integer_seed_is_taken_and_reproduces(client):
    """OpenAI's API takes any integer seed (run.c's "0 means the clock" is the CLI's -s only)."""
    for seed in (0, -3):
        request = dict(
            model=NAME, prompt="Lily saw a dog", max_tokens=20, temperature=1.0, seed=seed
        )
        first, again = (client.completions.create(**request).choices[0].text for _ in range(2))
        assert first == again and first


def test_embeddings_of_strings_and_token_ids(client, url):
    texts = ["Once upon a time there was a dog.", "Lily liked to play in the park."]
    answer = client.embeddings.create(model=NAME, input=texts)
    tokenizer = llamette.Tokenizer.load(BUNDLED / "tokenizer.bin")
    model = llamette.Transformer.load(BUNDLED / "model.bin")
    for item, text in zip(answer.data, texts, strict=True):
        expected = model.embedding(tokenizer.encode(text))
        assert max(abs(a - b) for a, b in zip(item.embedding, expected, strict=True)) < 1e-6
    ids = tokenizer.encode(texts[0])
    by_ids = client.embeddings.create(model=NAME, input=[ids])
    assert by_ids.data[0].embedding == answer.data[0].embedding
    assert answer.usage.prompt_tokens == sum(len(tokenizer.encode(t)) for t in texts)
    bad = httpx.post(f"{url}/v1/embeddings", json={"model": NAME, "input": [[-1]]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"


def test_logit_bias_penalties_and_min_p_reach_the_sampler(client):
    tokenizer = llamette.Tokenizer.load(BUNDLED / "tokenizer.bin")
    dog = tokenizer.encode(" dog", bos=False)[-1]
    request = dict(model=NAME, prompt="Once upon a time", max_tokens=6, temperature=0)
    forced = client.completions.create(**request, logit_bias={str(dog): 100})
    assert forced.choices[0].text == tokenizer.decode([dog]) * 6  # a piece without a space
    plain = client.completions.create(**{**request, "max_tokens": 40}).choices[0].text
    penalized = client.completions.create(
        **{**request, "max_tokens": 40}, frequency_penalty=2.0, presence_penalty=2.0,
        extra_body={"repeat_penalty": 1.5, "repeat_last_n": -1, "min_p": 0.05},
    ).choices[0].text  # fmt: skip
    assert penalized != plain and len(set(penalized.split())) > len(set(plain.split()))


def test_completion_logprobs_with_echo_through_the_openai_client(client):
    """echo: the prompt's text and one entry per prompt token (BOS first, without a
    log-probability), then the answer's; the chosen token of a greedy answer is the likeliest."""
    whole = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6,
                                      temperature=0, logprobs=2, echo=True)  # fmt: skip
    choice = whole.choices[0]
    logprobs = choice.logprobs
    n_prompt = whole.usage.prompt_tokens
    assert choice.text.startswith("Once upon a time")
    assert len(logprobs.tokens) == n_prompt + 6 == len(logprobs.token_logprobs)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    for word, logprob, top in zip(logprobs.tokens[n_prompt:], logprobs.token_logprobs[n_prompt:],
                                  logprobs.top_logprobs[n_prompt:], strict=True):  # fmt: skip
        assert len(top) == 2 and max(top.values()) == logprob == top[word]
    streamed = list(client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=6,
                                              temperature=0, logprobs=2, echo=True, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert tokens == logprobs.tokens


def test_chat_logprobs_through_the_openai_client(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert "".join(t.token for t in content).lstrip() == answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    streamed = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8,
                                              temperature=0, logprobs=True, stream=True)  # fmt: skip
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]  # fmt: skip
    assert tokens == [t.token for t in content]


@pytest.mark.parametrize("chat", [False, True])
def test_n_choices_each_equal_the_request_alone_with_its_seed(client, chat):
    """n: 4 shares one pass of the prompt; choice i samples with seed + i, so it is the same
    request with that seed and n: 1. Streamed, the chunks of each choice make its text."""
    settings = dict(model=NAME, max_tokens=24, temperature=1.0, seed=100)
    if chat:
        ask = client.chat.completions.create
        settings["messages"] = [{"role": "user", "content": "Tell me a story."}]
    else:
        ask = client.completions.create
        settings["prompt"] = "Once upon a time"

    def texts(answer):
        return [c.message.content if chat else c.text for c in answer.choices]

    together = ask(n=4, **settings)
    assert [c.index for c in together.choices] == [0, 1, 2, 3]
    alone = [texts(ask(**{**settings, "seed": 100 + i}))[0] for i in range(4)]
    assert texts(together) == alone and len(set(alone)) == 4
    assert together.usage.completion_tokens == sum(
        ask(**{**settings, "seed": 100 + i}).usage.completion_tokens for i in range(4)
    )
    streamed = ["", "", "", ""]
    for chunk in ask(n=4, stream=True, **settings):
        for choice in chunk.choices:
            streamed[choice.index] += (choice.delta.content or "") if chat else choice.text
    assert streamed == alone


def test_stop_token_ids_end_a_choice_at_that_token(client):
    request = dict(model=NAME, prompt="Once upon a time", max_tokens=30, temperature=0)
    plain = client.completions.create(**request, logprobs=0)
    third = plain.choices[0].logprobs.tokens[2]
    tokenizer = llamette.Tokenizer.load(BUNDLED / "tokenizer.bin")
    third_id = next(i for i, piece in enumerate(tokenizer.pieces) if piece.decode() == third)
    cut = client.completions.create(**request, extra_body={"stop_token_ids": [third_id]})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens == 2
    assert cut.choices[0].text == "".join(plain.choices[0].logprobs.tokens[:2])


@pytest.fixture(scope="module")
def guarded():
    """A server that asks for an API key and takes bodies of up to 2,000 bytes."""
    served = ServedModel.load(str(BUNDLED / "model.bin"), max_batch=2, name=NAME)
    served.api_key, served.max_body = "sesame", 2000
    with serving(served) as url:
        yield url, served


def test_an_api_key_is_asked_of_every_request_but_health(guarded):
    url, _ = guarded
    body = {"model": NAME, "prompt": "Once", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer open"}, {"Authorization": "sesame"}):
        answer = httpx.post(f"{url}/v1/completions", json=body, headers=headers)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
    assert client.completions.create(**body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_body_over_the_limit_is_413(guarded):
    url, _ = guarded
    headers = {"Authorization": "Bearer sesame"}
    big = {"model": NAME, "prompt": "Once " * 1000}
    assert httpx.post(f"{url}/v1/completions", json=big, headers=headers).status_code == 413

    def chunked():  # no content-length: counted as it arrives
        yield b'{"model": "stories", "prompt": "'
        for _ in range(100):
            yield b"Once upon a time " * 2
        yield b'"}'

    answer = httpx.post(f"{url}/v1/completions", content=chunked(), headers=headers)
    assert answer.status_code == 413 and "2000 bytes" in answer.json()["error"]["message"]


def test_an_internal_error_is_a_500_with_an_id_and_no_internals(guarded, monkeypatch):
    import logging

    url, served = guarded
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("llamette").addHandler(handler)  # wherever the CLI sends the log

    def broken(*args, **kwargs):
        raise RuntimeError("secret internals at /home/model")

    monkeypatch.setattr(served.tokenizer, "decode", broken)
    answer = httpx.post(f"{url}/detokenize", json={"tokens": [5, 6]},
                        headers={"Authorization": "Bearer sesame"})  # fmt: skip
    error = answer.json()["error"]
    assert answer.status_code == 500 and "secret" not in answer.text
    error_id = error["message"].split("(id ")[1].split(")")[0]
    logging.getLogger("llamette").removeHandler(handler)
    assert any(error_id in record.getMessage() and record.exc_info for record in records)


def test_tokenize_and_detokenize_as_llama_cpps_server(client, url):
    tokenizer = llamette.Tokenizer.load(BUNDLED / "tokenizer.bin")
    text = "Once upon a time</s>"
    plain = httpx.post(f"{url}/tokenize", json={"content": text}).json()["tokens"]
    assert plain == tokenizer.encode(text, bos=False, special=True)
    with_bos = httpx.post(f"{url}/tokenize", json={"content": text, "add_special": True,
                                                   "with_pieces": True}).json()["tokens"]  # fmt: skip
    assert [t["id"] for t in with_bos] == [1, *plain] and with_bos[0]["piece"] == "<s>"
    back = httpx.post(f"{url}/detokenize", json={"tokens": plain[:-1]}).json()["content"]
    assert back == "Once upon a time"
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_metrics_parse_as_prometheus_text_and_count(client, url):
    parser = pytest.importorskip("prometheus_client.parser", reason="a test dependency")

    def families():
        text = httpx.get(f"{url}/metrics").text
        return {f.name: f for f in parser.text_string_to_metric_families(text)}

    def value(family, **labels):
        return sum(s.value for s in family.samples if labels.items() <= s.labels.items())

    before = families()
    client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=5, temperature=0)
    after = families()
    completed = {"path": "/v1/completions", "status": "200"}
    assert value(after["llamette_requests"], **completed) == value(
        before["llamette_requests"], **completed) + 1  # fmt: skip
    assert (
        value(after["llamette_completion_tokens"]) - value(before["llamette_completion_tokens"])
        == 5
    )
    ttft = after["llamette_time_to_first_token_seconds"]
    assert (
        value(ttft, le="+Inf")
        == value(before["llamette_time_to_first_token_seconds"], le="+Inf") + 1
    )
    assert after["llamette_kv_slots"].samples[0].value == 16
    held = after["llamette_kv_positions_used"].samples[0].value  # the answer's rows, cached
    assert 0 < held <= after["llamette_kv_budget_positions"].samples[0].value
    assert {"llamette_requests_running", "llamette_requests_waiting", "llamette_preemptions",
            "llamette_inter_token_latency_seconds", "llamette_kv_slots_used"} <= after.keys()  # fmt: skip


def test_a_graceful_stop_ends_running_streams_with_a_finish_reason(monkeypatch):
    """SIGTERM's path (DrainingServer.shutdown): requests running get the text so far and
    finish_reason "abort", new connections are refused, and the server ends."""
    import threading

    import uvicorn

    from llamette.server import DrainingServer, create_app, listen

    served = ServedModel.load(str(BUNDLED / "model.bin"), max_batch=2, name=NAME)
    step = served.engine.step

    def slow_step():  # a long answer, so that the stop finds it running
        time.sleep(0.02)
        step()

    monkeypatch.setattr(served.engine, "step", slow_step)
    sock = listen("127.0.0.1", 0)
    server = DrainingServer(uvicorn.Config(create_app(served), log_level="warning"), served.engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    served.engine.ready.wait()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 200, "stream": True}
    lines = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            lines.append(line)
            if len(lines) == 6:
                server.should_exit = True  # what SIGTERM and Ctrl-C set
    thread.join(timeout=30)
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort" and lines[-2] == "data: [DONE]"
    assert 2 < sum(bool(c["choices"][0]["text"]) for c in chunks) < 200
    assert not thread.is_alive()


def test_the_kv_budget_defaults_to_half_the_memory_beside_the_weights(monkeypatch):
    """--kv-budget positions for all requests, by default what fits in half the memory
    available beside the weights, at most --max-batch whole contexts; a budget too small for
    one request of --ctx positions, or beyond the memory, is a one-line error."""
    from llamette import server

    config = llamette.Transformer.load(BUNDLED / "model.bin").config
    position = server.kv_position_bytes(config)
    assert position == 2 * 4 * 2 * 32 * 4  # K and V of 4 layers, 2 kv heads of 32, float32
    assert server.kv_position_bytes(config, "f16") == position // 2
    assert server.kv_position_bytes(config, "q8_0") == 2 * 4 * 2 * (32 + 4)  # a scale a block
    monkeypatch.setattr(server, "available_memory", lambda: 1000 * position + 5000)
    assert server.kv_budget_for(config, 100, 16, None, weight_bytes=5000) == 500
    assert server.kv_budget_for(config, 100, 3, None, weight_bytes=5000) == 300
    assert server.kv_budget_for(config, 100, 16, 250, weight_bytes=5000) == 250
    with pytest.raises(llamette.LlametteError, match="--kv-budget: 50 positions cannot hold"):
        server.kv_budget_for(config, 100, 16, 50, weight_bytes=5000)
    with pytest.raises(llamette.LlametteError, match="--kv-budget: 4000 positions take"):
        server.kv_budget_for(config, 250, 16, 5000, weight_bytes=5000)
    with pytest.raises(llamette.LlametteError, match="--ctx: one request of 600 positions"):
        server.kv_budget_for(config, 600, 16, None, weight_bytes=5000)
    monkeypatch.undo()  # the machine's own memory
    served = ServedModel.load(str(BUNDLED / "model.bin"), max_batch=8, ctx=100, kv_budget=300,
                              kv_type="q8_0")  # fmt: skip
    assert served.engine.n_slots == 8 and served.engine.kv_budget == 300
    assert served.engine.model.config.seq_len == 100
    assert served.engine.model.kv_cache.keys.dtype == np.int8
