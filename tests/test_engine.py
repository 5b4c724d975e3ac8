"""Continuous batching on the bundled model: requests in a crowd get the tokens they get alone."""

import json
import threading
from pathlib import Path

import numba
import numpy as np
import pytest

import llamette
from conftest import numpy_forward, read_jsonl, shared_path
from llamette import Sampler, Tokenizer, Transformer, generate
from llamette.completion import StopStrings
from llamette.engine import Engine, QueueFull, Request
from llamette.kernels import SMALL_BATCH, set_threads
from llamette.sampler import Adjustments

BUNDLED = Path(llamette.__file__).parent / "bundled"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(BUNDLED / "tokenizer.bin")


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    return Engine(Transformer.load(BUNDLED / "model.bin", n_slots=16), tokenizer, max_queue=4)


def make_request(tokenizer, prompt, max_tokens=40, temperature=0.0, seed=1, stop=(), topk=0,
                 bos=True):  # fmt: skip
    """A request whose events are collected on request.events."""
    events = []
    sampler = Sampler(tokenizer.vocab_size, temperature, topp=0.9, seed=seed, topk=topk)
    request = Request(tokenizer.encode(prompt, bos=bos), max_tokens, sampler, events.append,
                      StopStrings(stop))  # fmt: skip
    request.events = events
    return request


def run_until_idle(engine: Engine) -> None:
    while not engine.idle():
        engine.step()


def output(request) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) as the events told them."""
    end = request.events[-1]
    assert [e.finish_reason for e in request.events[:-1]] == [None] * (len(request.events) - 1)
    return "".join(e.text for e in request.events), end.finish_reason, end.completion_tokens


REQUESTS = [  # (prompt, max_tokens, temperature, seed, stop, top-k)
    ("Once upon a time", 60, 0.0, 1, (), 0),
    ("Lily had a red ball", 45, 0.8, 7, (), 0),
    ("", 30, 1.0, 42, (), 0),
    ("The cat", 50, 0.9, 3, (".",), 0),
    ("Tom and Mia went to the park", 25, 0.0, 1, ("park",), 0),
    ("One day, a little bird", 70, 1.2, 11, (), 20),
]


def test_a_request_gets_the_same_tokens_alone_and_in_a_crowd(engine, tokenizer):
    alone = []
    for spec in REQUESTS:
        request = make_request(tokenizer, *spec)
        engine.submit(request)
        run_until_idle(engine)
        alone.append(output(request))

    # 16 at once, arriving in two waves: the second joins while the first decodes
    crowd = [make_request(tokenizer, *REQUESTS[i % len(REQUESTS)]) for i in range(16)]
    for request in crowd[:9]:
        engine.submit(request)
    engine.step()
    engine.step()
    for request in crowd[9:]:
        engine.submit(request)
    run_until_idle(engine)
    for i, request in enumerate(crowd):
        assert output(request) == alone[i % len(REQUESTS)]
    assert (engine.stats()["running"], engine.stats()["waiting"]) == (0, 0)


def test_greedy_tokens_are_pytorchs(engine, tokenizer):
    """The continuation PyTorch recorded when it trained the model, served by the engine."""
    with open(BUNDLED / "train-log.json") as f:
        recorded = json.load(f)["greedy"]
    request = make_request(tokenizer, recorded["prompt"], max_tokens=len(recorded["ids"]))
    engine.submit(request)
    run_until_idle(engine)
    assert request.prompt_tokens == recorded["prompt_ids"]
    assert request.tokens == recorded["ids"][: len(request.tokens)]
    assert len(request.tokens) >= 100


def test_sampled_tokens_are_those_of_the_run_loop(engine, tokenizer):
    """Same seed, same settings: the engine samples what `llamette run` samples."""
    model = Transformer.load(BUNDLED / "model.bin")
    request = make_request(tokenizer, "Anna found a box", 80, 0.8, 5)
    run = generate(model, tokenizer, Sampler(tokenizer.vocab_size, 0.8, 0.9, seed=5),
                   "Anna found a box", steps=len(request.prompt_tokens) + 80)  # fmt: skip
    engine.submit(request)
    run_until_idle(engine)
    n = len(request.tokens)
    assert n > 20 and request.tokens == run.tokens[:n]


PROMPTS = [  # about 10 to 20 tokens: several share a pass, one spans two; and one of over 32
    "Once upon a time, there was a little girl named Lily who loved to play",
    "Tom had a big red truck. He liked to push it in the sand",
    "The sun was hot and the birds were singing in the tall green trees",
    "Sam and his dog went for a walk to the park near the lake",
    "One day, a little bird could not fly. It was sad and alone, so it sat under a tree and "
    "waited. A kind boy named Ben saw the bird and wanted to help it get better",
]


def test_prompts_that_share_passes_get_the_tokens_of_the_run_loop(engine, tokenizer):
    """Prompt tokens of new requests ride in the passes of the running ones (a prompt may span
    two passes; one over SMALL_BATCH tokens goes alone), and each request still gets exactly what
    `llamette run` gives it."""
    model = Transformer.load(BUNDLED / "model.bin")
    specs = [(prompt, temperature, seed) for temperature in (0.0, 0.9)
             for seed, prompt in enumerate(PROMPTS, start=1)]  # fmt: skip
    expected = []
    for prompt, temperature, seed in specs:
        sampler = Sampler(tokenizer.vocab_size, temperature, 0.9, seed=seed)
        steps = len(tokenizer.encode(prompt)) + 30
        expected.append(generate(model, tokenizer, sampler, prompt, steps).tokens)
    passes = []  # the slots of each pass's rows
    forward_batch = engine.model.forward_batch
    engine.model.forward_batch = lambda *args: passes.append(args[2]) or forward_batch(*args)
    try:
        crowd = [make_request(tokenizer, prompt, 30, temperature, seed)
                 for prompt, temperature, seed in specs]  # fmt: skip
        for request in crowd[:5]:
            engine.submit(request)
        engine.step()
        for request in crowd[5:]:
            engine.submit(request)
        run_until_idle(engine)
    finally:
        engine.model.forward_batch = forward_batch
    for request, tokens in zip(crowd, expected, strict=True):
        assert len(request.tokens) == 30 or request.events[-1].finish_reason == "stop"
        assert request.tokens == tokens[: len(request.tokens)]
    slots_with_prompt_rows = [{s for s in slots if list(slots).count(s) > 1} for slots in passes]
    assert max(map(len, slots_with_prompt_rows)) >= 2  # two prompts in one pass
    shared = [len(slots) for slots in passes if len(set(slots)) > 1]
    assert max(shared) == SMALL_BATCH  # shared passes fill up, and no further
    assert any(len(set(slots)) == 1 and len(slots) > SMALL_BATCH for slots in passes)  # the long


def test_stop_strings_end_the_text_before_them(engine, tokenizer):
    free = make_request(tokenizer, "Once upon a time", 60)
    stopped = make_request(tokenizer, "Once upon a time", 60, stop=("girl", "xyz"))
    for request in (free, stopped):
        engine.submit(request)
    run_until_idle(engine)
    text, _, _ = output(free)
    assert "girl" in text
    assert output(stopped)[:2] == (text[: text.index("girl")], "stop")


def test_max_tokens_ends_with_length(engine, tokenizer):
    request = make_request(tokenizer, "Once upon a time", 5)
    engine.submit(request)
    run_until_idle(engine)
    assert output(request)[1:] == ("length", 5)
    assert tokenizer.decode(request.tokens).startswith(output(request)[0].strip())


def test_cancelled_requests_leave_and_free_their_slot(engine, tokenizer):
    requests = [make_request(tokenizer, "Once upon a time", 100) for _ in range(3)]
    for request in requests:
        engine.submit(request)
    engine.step()
    requests[1].cancelled = True
    engine.step()
    assert engine.stats()["running"] == 2 and engine.stats()["cancelled"] == 1
    run_until_idle(engine)
    assert output(requests[0]) == output(requests[2])
    assert all(e.finish_reason is None for e in requests[1].events)


def test_a_full_queue_refuses_more(engine, tokenizer):
    accepted = [make_request(tokenizer, "Hi", 3) for _ in range(16 + 4)]  # slots + max_queue
    for request in accepted:
        engine.submit(request)
    with pytest.raises(QueueFull):
        engine.submit(make_request(tokenizer, "Hi", 3))
    run_until_idle(engine)
    assert all(output(r)[1] == "length" for r in accepted)


def test_a_request_beyond_the_context_is_refused(engine, tokenizer):
    with pytest.raises(llamette.LlametteError, match="context"):
        engine.submit(make_request(tokenizer, "Once", max_tokens=engine.model.config.seq_len))


def test_every_model_call_runs_on_the_engine_thread(tokenizer):
    """The warm-up too: one thread starts all parallel work (see Engine.start)."""
    model = Transformer.load(BUNDLED / "model.bin", n_slots=2)
    callers = set()

    def on_the_record(call):
        def recorded(*args, **kwargs):
            callers.add(threading.current_thread().name)
            return call(*args, **kwargs)

        return recorded

    model.prefill, model.forward_batch = map(on_the_record, (model.prefill, model.forward_batch))
    engine = Engine(model, tokenizer)
    engine.start()
    try:
        assert callers == {"llamette-engine"}  # warmed up before start() returned
        done = threading.Event()
        request = make_request(tokenizer, "Once upon a time", 5)
        request.on_event = lambda event: event.finish_reason and done.set()
        engine.submit(request)
        assert done.wait(60)
    finally:
        engine.stop()
    assert callers == {"llamette-engine"} and len(request.tokens) == 5


def test_start_raises_what_the_warm_up_raised(tokenizer):
    engine = Engine(Transformer.load(BUNDLED / "model.bin"), tokenizer)
    engine.model.prefill = None  # not callable: the warm-up fails
    with pytest.raises(TypeError):
        engine.start()
    assert engine.fault().startswith("the engine could not start: ")


def test_a_stopped_engine_says_so(tokenizer):
    engine = Engine(Transformer.load(BUNDLED / "model.bin"), tokenizer)
    assert engine.fault() is None  # not started yet
    engine.start()
    assert engine.fault() is None
    engine.stop()
    assert engine.fault() == "the engine's thread has stopped"


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one thread is all there is")
def test_the_engine_thread_runs_with_the_threads_asked_for(tokenizer):
    """`llamette serve --threads 1` sets the count on the main thread, where the engine is made;
    Numba's count belongs to each thread, and every kernel of the server runs on the engine's."""
    model = Transformer.load(BUNDLED / "model.bin")
    set_threads(1)
    try:
        engine = Engine(model, tokenizer)
    finally:
        set_threads()  # every core again, for the tests that follow
    seen = []
    engine.warm_up = lambda: seen.append(numba.get_num_threads())
    engine.start()
    engine.stop()
    assert seen == [1] and numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    explicit = Engine(model, tokenizer, threads=2)
    explicit.warm_up = lambda: seen.append(numba.get_num_threads())
    explicit.start()
    explicit.stop()
    assert seen == [1, 2]


@pytest.mark.parametrize("name", ["rand-gqa.v0.bin", "rand-gqa.v2.bin"])  # run.c's, runq.c's
def test_an_exact_engine_samples_run_c_s_tokens_for_requests_in_a_crowd(name):
    """A random model's flat distributions turn any last-bit difference into another token, so
    only run.c's (runq.c's) arithmetic to the bit gives the tokens it printed: the batched passes
    of an exact model give them to every request, prompts and decode steps sharing passes."""

    def sampled(row) -> bool:
        argv = row["argv"]
        return argv[0] == name and "-m" not in argv and argv[argv.index("-t") + 1] != "0"

    rows = [row for row in read_jsonl("expected", "generate.jsonl") if sampled(row)]
    model = Transformer.load(shared_path("models", name), exact=True, n_slots=len(rows))
    engine = Engine(model, Tokenizer.load(shared_path("models", "tokenizer.bin")))
    requests = []
    for row in rows:
        flags = dict(zip(row["argv"][1::2], row["argv"][2::2], strict=True))
        sampler = Sampler(model.config.vocab_size, float(flags["-t"]), float(flags["-p"]),
                          int(flags["-s"]))  # fmt: skip
        prompt = row["prompt_ids"]
        steps = int(
            flags["-n"]
        )  # positions, the prompt's included: steps - len(prompt) + 1 sampled
        requests.append(Request(prompt, steps - len(prompt) + 1, sampler, lambda event: None))
        engine.submit(requests[-1])
    assert len(requests) >= 4
    run_until_idle(engine)
    for row, request in zip(rows, requests, strict=True):
        assert request.prompt_tokens[1:] + request.tokens == row["ids"]


@pytest.mark.parametrize("echo", [False, True])
def test_logprobs_are_a_float64_log_softmax_of_the_models_logits(engine, tokenizer, echo):
    """Each sampled token's log-probability and top alternatives, before the penalties that
    changed what was drawn, against conftest's float64 NumPy forward; echoed, the prompt's too
    (the first without one). Sampled in a crowd, so the batched rows are checked as well."""
    prompt = tokenizer.encode("Lily had a red ball")
    penalized = Sampler(tokenizer.vocab_size, 1.0, 0.9, seed=5,
                        adjust=Adjustments(repeat_penalty=1.5, presence_penalty=1.0))  # fmt: skip
    penalized.accept(prompt)
    request = Request(prompt, 30, penalized, lambda e: None, logprobs=3, echo_logprobs=echo)
    crowd = [make_request(tokenizer, text, 30) for text in ("Once upon a time", "The cat")]
    for other in crowd:
        engine.submit(other)
    engine.submit(request)
    run_until_idle(engine)

    entries = request.token_logprobs
    tokens = prompt + request.tokens
    weights = engine.model.weights
    logits = numpy_forward(weights.config, dict(weights.tensors), tokens[:-1])  # (n - 1, V)
    z = logits - logits.max(axis=1, keepdims=True)
    expected = z - np.log(np.exp(z).sum(axis=1, keepdims=True))  # row i: the token at i + 1
    if echo:
        assert len(entries) == len(tokens) and entries[0].logprob is None
        entries, first = entries[1:], 0
    else:
        assert len(entries) == len(request.tokens)
        first = len(prompt) - 1
    for i, entry in enumerate(entries):
        row = expected[first + i]
        assert entry.token == tokens[first + i + 1]
        assert abs(entry.logprob - row[entry.token]) < 1e-4
        assert [t for t, _ in entry.top] == list(np.argsort(-row)[:3])
        assert np.allclose([p for _, p in entry.top], np.sort(row)[::-1][:3], atol=1e-4)


def test_choices_share_the_prompts_pass_and_each_draws_as_it_would_alone(engine, tokenizer):
    prompt = "Lily had a red ball"
    choices = [make_request(tokenizer, prompt, 30, 1.0, seed=10 + i) for i in range(4)]
    first, *others = choices
    first.siblings = others
    engine.submit(make_request(tokenizer, "The cat", 20))
    engine.submit(first)
    engine._admit()  # the others take the first's prompt pass: they have nothing to feed
    assert first.fed == 0 and all(other.fed == len(other.prompt_tokens) for other in others)
    run_until_idle(engine)
    for i, choice in enumerate(choices):
        alone = make_request(tokenizer, prompt, 30, 1.0, seed=10 + i)
        engine.submit(alone)
        run_until_idle(engine)
        assert output(choice) == output(alone)
    assert len({output(choice)[0] for choice in choices}) == 4


def test_choices_cancelled_before_their_prompts_pass_all_end(engine, tokenizer):
    choices = [make_request(tokenizer, "Once upon a time", 30, 1.0, seed=i) for i in range(3)]
    choices[0].siblings = choices[1:]
    engine.submit(choices[0])
    engine._admit()  # they hold their slots now
    choices[0].cancelled = True
    run_until_idle(engine)
    assert engine.stats()["running"] == 0 and len(engine._free_slots) == engine.n_slots
    with pytest.raises(llamette.LlametteError, match="17 choices need as many slots"):
        choices[0].siblings = [make_request(tokenizer, "x") for _ in range(16)]
        engine.submit(choices[0])


def test_chunked_prefill_keeps_the_others_decoding_and_every_answer_the_same(tokenizer):
    """With chunked_prefill (the server's), a long prompt arriving goes in with the decode
    rows, a pass of SMALL_BATCH rows at a time: the running requests gain a token every round
    meanwhile, and every request gets the tokens it gets alone."""
    model = Transformer.load(BUNDLED / "model.bin", n_slots=4)
    engine = Engine(model, tokenizer, chunked_prefill=True)
    story = "Lily and Tom went to the park to play with a big red ball. " * 12
    specs = [(f"Once upon a time {i}", 60, 0.9, i) for i in range(3)] + [(story, 20, 0.8, 7)]
    *running, long_one = [make_request(tokenizer, *spec) for spec in specs]
    for request in running:
        engine.submit(request)
    engine.step()
    engine.step()
    assert len(long_one.prompt_tokens) > 4 * SMALL_BATCH
    engine.submit(long_one)
    rounds = 0
    while long_one.fed < len(long_one.prompt_tokens):
        before = [len(r.tokens) for r in running]
        engine.step()
        rounds += 1
        assert [len(r.tokens) for r in running] == [n + 1 for n in before]
    assert rounds > 4
    run_until_idle(engine)
    for spec, request in zip(specs, [*running, long_one], strict=True):
        alone = make_request(tokenizer, *spec)
        engine.submit(alone)
        run_until_idle(engine)
        assert output(alone) == output(request)


def test_a_prompt_starting_with_a_finished_requests_tokens_reuses_their_kv_rows(tokenizer):
    """The chunked engine's prompt cache: a second turn that repeats the first turn's prompt
    and answer starts after them (fed), and answers as an engine with an empty cache
    does; a prompt that shares nothing takes the least recently freed slot instead."""
    from llamette.metrics import Metrics

    def engine() -> Engine:
        model = Transformer.load(BUNDLED / "model.bin", n_slots=2)
        return Engine(model, tokenizer, chunked_prefill=True, metrics=Metrics())

    cached = engine()
    first = make_request(tokenizer, "Lily and Tom went to the park to play with a ball.", 30, 0.9)
    cached.submit(first)
    run_until_idle(cached)
    held = first.prompt_tokens + first.tokens  # all fed but the last sampled
    second_prompt = held + tokenizer.encode(" Then they went home.", bos=False)
    second = make_request(tokenizer, "", 20, 0.9, seed=3)
    second.prompt_tokens = second_prompt
    cached.submit(second)
    cached._admit()
    assert second.slot == first_slot(cached, first) and second.fed == len(held) - 1
    run_until_idle(cached)
    assert cached.metrics.reused_prompt_tokens == len(held) - 1

    fresh = engine()
    alone = make_request(tokenizer, "", 20, 0.9, seed=3)
    alone.prompt_tokens = second_prompt
    fresh.submit(alone)
    run_until_idle(fresh)
    assert output(alone) == output(second) and fresh.metrics.reused_prompt_tokens == 0

    other = make_request(tokenizer, "A cat sat on a mat and looked at the moon all night.", 5)
    cached.submit(other)
    cached._admit()
    assert other.fed == 0 and other.slot != second.slot


def first_slot(engine: Engine, request: Request) -> int:
    """The slot whose cached tokens are the request's (it has left it)."""
    held = (request.prompt_tokens + request.tokens)[: request.written]
    return next(s for s, tokens in engine._cached.items() if list(tokens) == held)


def test_choices_cancelled_mid_prompt_and_drained_while_waiting_all_end(tokenizer):
    """A disconnected client's choices, dropped before their first token, leave the engine
    working; a drain tells every choice of a request still waiting."""
    model = Transformer.load(BUNDLED / "model.bin", n_slots=4)
    engine = Engine(model, tokenizer, chunked_prefill=True)
    story = "Lily and Tom went to the park to play with a big red ball. " * 6
    group = [make_request(tokenizer, story, 10, 1.0, seed=i) for i in range(2)]
    group[0].siblings = group[1:]
    engine.submit(group[0])
    engine.step()  # admitted, its prompt partly fed
    for request in group:
        request.cancelled = True
    engine.step()
    assert engine.idle() and engine.slots_used() == 0
    alive = make_request(tokenizer, "Once upon a time", 5)
    engine.submit(alive)
    run_until_idle(engine)
    assert output(alive)[1] == "length"

    blockers = [make_request(tokenizer, "Once", 50, seed=i) for i in range(3)]
    for request in blockers:
        engine.submit(request)
    engine.step()
    waiting = [make_request(tokenizer, "Tom", 10, 1.0, seed=i) for i in range(3)]
    waiting[0].siblings = waiting[1:]
    engine.submit(waiting[0])  # 3 slots needed, 1 free: it waits
    engine.drain()
    engine.step()
    assert [r.events[-1].finish_reason for r in [*blockers, *waiting]] == ["abort"] * 6
    with pytest.raises(llamette.LlametteError, match="shutting down"):
        engine.submit(make_request(tokenizer, "x"))
    with pytest.raises(llamette.LlametteError, match="at least one prompt token"):
        Engine(model, tokenizer).submit(make_request(tokenizer, "", bos=False))


def test_echoed_prompts_go_in_small_passes_and_serve_later_prompts(tokenizer):
    """In the chunked engine an echo request's prompt goes alone through passes of at most
    SMALL_BATCH rows, whose rows any pass would compute: its slot serves a later prompt that
    starts with its tokens, which answers as with an empty cache. An embedding's rows come from
    the batched kernels: nothing is cached and its memory goes back at once."""

    def engine() -> Engine:
        return Engine(Transformer.load(BUNDLED / "model.bin", n_slots=1), tokenizer,
                      chunked_prefill=True)  # fmt: skip

    cached = engine()
    echoed = make_request(tokenizer, "Lily and Tom went to the park to play with a ball. " * 3, 5)
    echoed.echo_logprobs, echoed.logprobs = True, 0
    cached.submit(echoed)
    run_until_idle(cached)
    assert len(echoed.prompt_tokens) > SMALL_BATCH
    held = echoed.prompt_tokens + echoed.tokens
    answers = []
    for each in (cached, engine()):
        later = make_request(tokenizer, "", 20, 0.9, seed=3)
        later.prompt_tokens = held + tokenizer.encode(" Then they went home.", bos=False)
        each.submit(later)
        each._admit()
        reused = later.fed
        run_until_idle(each)
        answers.append((reused, output(later)))
    assert answers[0][0] == len(held) - 1 and answers[1][0] == 0
    assert answers[0][1] == answers[1][1]

    embedding = make_request(tokenizer, "A cat sat on a mat.", 1)
    embedding.embed = True
    cached.submit(embedding)
    run_until_idle(cached)
    assert embedding.events[-1].embedding and cached._cached == {}
    assert cached.model.kv_held.sum() == 0


def test_a_kv_budget_preempts_the_latest_request_and_its_tokens_stay_the_same(tokenizer):
    """Four requests of up to 200 positions cannot all hold their rows within a budget of one
    context (256 positions): the engine gives back cached rows, then preempts the latest
    admitted request, which resumes from position 0 when there is room; the memory held never
    exceeds the budget and every answer is what the request gets alone."""
    model = Transformer.load(BUNDLED / "model.bin", n_slots=4)
    budget = model.config.seq_len
    engine = Engine(model, tokenizer, chunked_prefill=True, kv_budget=budget)
    specs = [(f"Once upon a time {i}", 190, 0.8, i) for i in range(4)]
    requests = [make_request(tokenizer, *spec) for spec in specs]
    for request in requests:
        engine.submit(request)
    most_held = 0
    while not engine.idle():
        engine.step()
        most_held = max(most_held, model.kv_held.sum())
    assert engine.preempted >= 2 and budget - 8 <= most_held <= budget
    for spec, request in zip(specs, requests, strict=True):
        alone = make_request(tokenizer, *spec)
        engine.submit(alone)
        run_until_idle(engine)
        assert output(alone) == output(request)

    long_prompt = make_request(tokenizer, "Once upon a time", 5, 1.0)
    long_prompt.prompt_tokens *= 40
    long_prompt.siblings = [make_request(tokenizer, "x")]
    long_prompt.siblings[0].prompt_tokens = long_prompt.prompt_tokens
    with pytest.raises(llamette.LlametteError, match="2 choices of .* exceed the KV budget of 256"):
        engine.submit(long_prompt)
    with pytest.raises(llamette.LlametteError, match="a KV budget needs chunked prefill"):
        Engine(model, tokenizer, kv_budget=budget)
