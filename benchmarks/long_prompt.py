"""A long prompt arriving while streams decode: how much it holds them up; and a second prompt
that repeats a first one's: how much sooner it answers from the prompt cache.

Usage: python benchmarks/long_prompt.py [--model stories110M] [--type f32] [--prompt-tokens 900]
                                        [--rounds 3] [--baseline OLD/src] [--ctx 1024]
                                        [--stream-tokens 160]

`llamette serve` runs 8 streamed completions (greedy, 160 tokens each); in one run nothing else
arrives, in the other a prompt of about --prompt-tokens tokens arrives once the streams are
under way. Reported for each: the streams' inter-token latency (the time between consecutive
chunks; median, p99, max) and the long prompt's time to its first token. Then, on a fresh
server, the long prompt alone and again with a sentence added (greedy, 16 tokens): both times
to the first token, and whether the second answer equals that of a server with an empty cache.
With --baseline, a
second build (its src folder, e.g. a git worktree of an older commit) runs the same load in
alternating rounds. Medians over the rounds; the table goes to benchmarks/results/long_prompt.md
(long_prompt_MODEL_TYPE.md for other models).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from bench import DEFAULT_TOKENIZER, RESULTS, THREADS, ensure_peer
from models import ensure_model
from serve import Server, free_port

STREAMS = 8
STREAM_TOKENS = 160
CONTEXT = 1024


def server(model: Path, source: Path | None) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "llamette", "serve", str(model), "-z", str(DEFAULT_TOKENIZER),
               "--port", str(port), "--max-batch", str(STREAMS + 1), "--threads", str(THREADS),
               "--ctx", str(CONTEXT)]  # fmt: skip
    if source is not None:  # another build's package first on the path
        os.environ["PYTHONPATH"] = str(source)
    try:
        started = Server(command, port)
    finally:
        os.environ.pop("PYTHONPATH", None)
    while httpx.get(f"{started.url}/health").status_code == 503:  # its kernels still load
        time.sleep(0.2)
    return started


async def stream_gaps(http: httpx.AsyncClient, url: str, model: str, index: int) -> list[float]:
    """The seconds between one stream's consecutive chunks."""
    body = {"model": model, "prompt": f"Once upon a time, a child named number {index}",
            "max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True}  # fmt: skip
    times = []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                times.append(time.perf_counter())
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def long_prompt_ttft(http: httpx.AsyncClient, url: str, model: str, words: int) -> float:
    await asyncio.sleep(1.0)  # the streams are under way
    body = {"model": model, "prompt": story(words), "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    answer = (await http.post(f"{url}/v1/completions", json=body)).json()
    assert answer["usage"]["completion_tokens"] == 1, answer
    return time.perf_counter() - start


async def one_run(url: str, model: str, words: int | None) -> dict:
    async with httpx.AsyncClient(timeout=600) as http:
        tasks = [stream_gaps(http, url, model, i) for i in range(STREAMS)]
        if words:
            *gaps, ttft = await asyncio.gather(*tasks, long_prompt_ttft(http, url, model, words))
        else:
            gaps, ttft = await asyncio.gather(*tasks), None
    every = sorted(g for stream in gaps for g in stream)
    p99 = every[min(len(every) - 1, int(0.99 * len(every)))]
    return {"median": statistics.median(every), "p99": p99, "max": every[-1], "ttft": ttft}


SENTENCE = " Then they went home."


def story(words: int) -> str:
    """About ten tokens per `words`: a nine-word sentence again and again."""
    return " ".join(["Lily", "and", "Tom", "played", "in", "the", "big", "green", "park."] * words)


async def greedy_text(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    async with httpx.AsyncClient(timeout=600) as http:
        return (await http.post(f"{url}/v1/completions", json=body)).json()["choices"][0]["text"]


async def prefix_reuse(url: str, model: str, words: int) -> tuple[float, float, str]:
    """(time to the first token of a long prompt, of the same prompt with a sentence added,
    the second answer's text)."""
    times, text = [], ""
    async with httpx.AsyncClient(timeout=600) as http:
        for prompt in (story(words), story(words) + SENTENCE):
            body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                    "stream": True}  # fmt: skip
            start, first, pieces = time.perf_counter(), None, []
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter()
                        pieces.append(json.loads(line[6:])["choices"][0]["text"])
            times.append(first - start)
            text = "".join(pieces)
    return times[0], times[1], text


def median_ms(results: list[dict], key: str) -> str:
    values = [r[key] for r in results if r[key] is not None]
    return f"{statistics.median(values) * 1000:.1f}" if values else "-"


def main() -> None:
    global CONTEXT, STREAM_TOKENS  # the servers' context and the streams' length, for this run
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stories110M")
    parser.add_argument("--type", default="f32")
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another build's src folder")
    parser.add_argument("--ctx", type=int, default=CONTEXT, help="the server's --ctx")
    parser.add_argument("--stream-tokens", type=int, default=STREAM_TOKENS)
    args = parser.parse_args()
    CONTEXT, STREAM_TOKENS = args.ctx, args.stream_tokens
    path = ensure_model(args.model, args.type, DEFAULT_TOKENIZER, ensure_peer())["llamette"]
    words = args.prompt_tokens // 10  # about ten tokens to the nine-word sentence
    builds = {"this build": None, **({"baseline": args.baseline} if args.baseline else {})}
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for build, source in builds.items():
            served = server(path, source)
            try:
                for load, n in (("streams alone", None), ("a long prompt arrives", words)):
                    result = asyncio.run(one_run(served.url, served.model, n))
                    runs.setdefault((build, load), []).append(result)
            finally:
                served.stop()

    lines = [
        f"{STREAMS} greedy streams of {STREAM_TOKENS} tokens on {args.model} {args.type} "
        f"({THREADS} threads), a prompt of about {args.prompt_tokens} tokens arriving 1 s in; "
        f"medians of {args.rounds} rounds ({time.strftime('%Y-%m-%d')}), milliseconds:",
        "",
        "| build | load | inter-token median | p99 | max | long prompt's first token |",
        "|---|---|---|---|---|---|",
    ]
    for (build, load), results in runs.items():
        cells = [median_ms(results, key) for key in ("median", "p99", "max", "ttft")]
        lines.append(f"| {build} | {load} | {' | '.join(cells)} |")
    served = server(path, None)
    try:
        first, second, text = asyncio.run(prefix_reuse(served.url, served.model, words))
    finally:
        served.stop()
    served = server(path, None)  # an empty cache: the second prompt first
    try:
        alone_text = asyncio.run(greedy_text(served.url, served.model, story(words) + SENTENCE))
    finally:
        served.stop()
    lines += [
        "",
        f"Prompt cache: the long prompt's first token after {first * 1000:.0f} ms; the same "
        f"prompt with a sentence added, after {second * 1000:.0f} ms "
        f"({first / second:.1f} times sooner); its answer "
        f"{'equals' if text == alone_text else 'DIFFERS FROM'} the same request on a server "
        "with an empty cache.",
    ]
    print("\n".join(lines))
    name = "" if (args.model, args.type) == ("stories110M", "f32") else f"_{args.model}_{args.type}"
    (RESULTS / f"long_prompt{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
