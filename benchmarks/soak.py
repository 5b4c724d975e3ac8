"""Soak: many clients for minutes, every kind of request, against one `llamette serve`.

Usage: python benchmarks/soak.py [--minutes 10] [--clients 64] [--model stories15M]

Each client sends, one after another until the time is up, a request of a kind drawn at random:
a plain greedy completion, a sampled one (seeded), a streamed one, a stream it abandons after a
few chunks, a malformed body, a prompt longer than the context, or a chat turn that repeats a
long shared prefix. Expected answers: 200 for the well-formed ones (429 when the queue is full
counts as answered), 400 for the malformed and the over-long. After the soak, every distinct
greedy request is sent again alone and must get the same text. The server's resident memory is
read after the first minute and at the end; the table goes to benchmarks/results/soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from bench import DEFAULT_TOKENIZER, RESULTS, ensure_peer
from models import ensure_model
from serve import Server, free_port

SHARED_PREFIX = "You are a storyteller. You tell short, kind stories about animals. " * 6


def server(model: Path, max_queue: int) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "llamette", "serve", str(model), "-z", str(DEFAULT_TOKENIZER),
               "--port", str(port), "--max-batch", "16", "--max-queue", str(max_queue)]  # fmt: skip
    started = Server(command, port)
    while httpx.get(f"{started.url}/health").status_code == 503:  # its kernels still load
        time.sleep(0.2)
    return started


class Soak:
    def __init__(self, url: str, model: str, seconds: float, seed: int):
        self.url, self.model, self.deadline = url, model, time.monotonic() + seconds
        self.rng = random.Random(seed)
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.greedy: dict[str, str] = {}  # body (JSON) -> text, for the replay
        self.unexpected: list[str] = []

    def body(self, kind: str) -> dict | bytes:
        n = self.rng.randrange(1000)
        base = {"model": self.model, "max_tokens": self.rng.choice([8, 16, 32])}
        if kind == "greedy":
            return {**base, "prompt": f"Story {n % 40}: once upon a time", "temperature": 0}
        if kind == "sampled":
            return {**base, "prompt": "Once upon a time", "temperature": 0.9, "seed": n}
        if kind in ("stream", "abandon"):
            return {**base, "prompt": f"Tale {n}:", "stream": True, "max_tokens": 48}
        if kind == "malformed":
            return self.rng.choice([b"{not json", b'{"model": 3}', b"[]", b'{"prompt": "x"}'])
        if kind == "too long":
            return {**base, "prompt": "once upon a time " * 400}
        messages = [{"role": "system", "content": SHARED_PREFIX},
                    {"role": "user", "content": f"Tell story number {n % 20}."}]  # fmt: skip
        return {**base, "messages": messages, "temperature": 0}

    async def client(self, http: httpx.AsyncClient) -> None:
        kinds = ["greedy", "sampled", "stream", "abandon", "malformed", "too long", "prefix"]
        weights = [3, 2, 2, 1, 1, 1, 2]
        while time.monotonic() < self.deadline:
            kind = self.rng.choices(kinds, weights)[0]
            body = self.body(kind)
            try:
                outcome = await self.send(http, kind, body)
            except httpx.HTTPError as error:
                outcome = f"transport error: {type(error).__name__}"
            self.outcomes[kind, outcome] += 1
            expected = {"malformed": "400", "too long": "400"}.get(kind, "200")
            if outcome not in (expected, "429"):
                self.unexpected.append(f"{kind}: {outcome}")

    async def send(self, http: httpx.AsyncClient, kind: str, body: dict | bytes) -> str:
        path = "/v1/chat/completions" if kind == "prefix" else "/v1/completions"
        if isinstance(body, bytes):
            response = await http.post(f"{self.url}{path}", content=body,
                                       headers={"content-type": "application/json"})  # fmt: skip
            return str(response.status_code)
        if kind in ("stream", "abandon"):
            async with http.stream("POST", f"{self.url}{path}", json=body) as response:
                chunks = 0
                async for line in response.aiter_lines():
                    chunks += line.startswith("data: ")
                    if kind == "abandon" and chunks == 3:
                        break  # the client goes away mid-stream
                return str(response.status_code)
        response = await http.post(f"{self.url}{path}", json=body)
        if response.status_code == 200 and kind in ("greedy", "prefix"):
            answer = response.json()["choices"][0]
            self.greedy[json.dumps(body, sort_keys=True)] = answer.get("text") or answer[
                "message"]["content"]  # fmt: skip
        return str(response.status_code)


async def run(url: str, model: str, seconds: float, clients: int, seed: int) -> Soak:
    soak = Soak(url, model, seconds, seed)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(soak.client(http) for _ in range(clients)))
    return soak


async def replay(url: str, soak: Soak) -> int:
    """Greedy requests whose text differs when sent again alone."""
    differing = 0
    async with httpx.AsyncClient(timeout=300) as http:
        for key, text in soak.greedy.items():
            body = json.loads(key)
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            answer = (await http.post(f"{url}{path}", json=body)).json()["choices"][0]
            differing += (answer.get("text") or answer["message"]["content"]) != text
    return differing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--model", default="stories15M")
    parser.add_argument("--max-queue", type=int, default=64)
    args = parser.parse_args()
    path = ensure_model(args.model, "f32", DEFAULT_TOKENIZER, ensure_peer())["llamette"]
    served = server(path, args.max_queue)
    try:
        first = min(60.0, args.minutes * 60 / 2)
        soak = asyncio.run(run(served.url, served.model, first, args.clients, seed=1))
        rss_early = served.rss_mib()
        rest = asyncio.run(run(served.url, served.model, args.minutes * 60 - first,
                               args.clients, seed=2))  # fmt: skip
        rss_late = served.rss_mib()
        soak.outcomes.update(rest.outcomes)
        soak.greedy.update(rest.greedy)
        soak.unexpected += rest.unexpected
        alive = served.process.poll() is None
        differing = asyncio.run(replay(served.url, soak))
    finally:
        served.stop()
    total = sum(soak.outcomes.values())
    lines = [
        f"Soak of `llamette serve` ({args.model} F32, 16 slots, queue {args.max_queue}): "
        f"{args.clients} clients for {args.minutes:g} minutes ({time.strftime('%Y-%m-%d')}).",
        "",
        "| request | outcome | count |",
        "|---|---|---|",
        *(f"| {kind} | {outcome} | {count} |" for (kind, outcome), count in sorted(soak.outcomes.items())),
        "",
        f"{total} requests; server alive at the end: {alive}; unexpected outcomes: "
        f"{len(soak.unexpected)}{' (' + ', '.join(soak.unexpected[:5]) + ')' if soak.unexpected else ''}; "
        f"greedy answers replayed alone: {len(soak.greedy)}, differing: {differing}; resident "
        f"memory {rss_early:.1f} MiB after {first / 60:g} min, {rss_late:.1f} MiB at the end "
        f"({(rss_late / rss_early - 1) * 100:+.1f}%).",
    ]  # fmt: skip
    print("\n".join(lines))
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
