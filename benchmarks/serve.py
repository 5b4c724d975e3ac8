"""`llamette serve` against llama.cpp's OpenAI server (llama-cpp-python[server]) under one load.

Throughput: for stories110M (random weights of the real shape; F32 and Q8_0, and GGUF files of
the same weights for llama.cpp), 1, 4 and 16 concurrent clients send 16 completions in all
(about 16 prompt tokens each, 64 generated, greedy, not streamed), each client one request after
another; the figure is generated tokens (the servers' own usage counts) per second of wall time.
Both servers get the same threads and the same load generator; rounds alternate between them and
figures are medians.

Stress: 1,000 requests from 16 clients (half streamed, sampled with their own seeds) to
`llamette serve` on stories15M F32; each answer must equal the same request answered alone, and
the server's resident memory is read after the first and the second 500.

Usage: python benchmarks/serve.py [--rounds 3] [--skip-stress]
Writes benchmarks/results/serve.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from bench import DEFAULT_TOKENIZER, RESULTS, THREADS, cpu_name, ensure_peer
from models import ensure_model

CLIENTS = (1, 4, 16)
REQUESTS = 16  # per load level, shared among the clients
MAX_TOKENS = 64
CONTEXT = 1024


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A server process on a free port, ready when /health (or /v1/models) answers."""

    def __init__(self, command: list[str], port: int):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                self.model = httpx.get(f"{self.url}/v1/models").json()["data"][0]["id"]
                return
            except (httpx.TransportError, ValueError, KeyError):
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited: {' '.join(command)}") from None
                time.sleep(0.1)
        raise RuntimeError(f"server did not start: {' '.join(command)}")

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def llamette_server(model: Path, ctx: int | None = CONTEXT) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "llamette", "serve", str(model), "-z", str(DEFAULT_TOKENIZER),
               "--port", str(port), "--max-batch", "16", "--threads", str(THREADS)]  # fmt: skip
    if ctx:
        command += ["--ctx", str(ctx)]
    return Server(command, port)


def llamacpp_server(peer_python: Path, model: Path) -> Server:
    port = free_port()
    command = [str(peer_python), "-m", "llama_cpp.server", "--model", str(model),
               "--n_ctx", str(CONTEXT), "--n_threads", str(THREADS),
               "--n_threads_batch", str(THREADS), "--interrupt_requests", "False",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return Server(command, port)


def request_body(model: str, index: int, **extra) -> dict:
    prompt = f"Once upon a time, in a town called number {index}, a little girl"
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


async def load(server: Server, clients: int, bodies: list[dict], stream: bool = False) -> tuple:
    """Send bodies from `clients` concurrent clients, each one request after another:
    (answers in order, generated tokens, wall seconds)."""
    answers: list = [None] * len(bodies)
    queue = list(range(len(bodies)))

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            index = queue.pop(0)
            body = bodies[index]
            if stream and index % 2:
                text, tokens = await streamed(http, server, body)
            else:
                answer = (await http.post(f"{server.url}/v1/completions", json=body)).json()
                text, tokens = answer["choices"][0]["text"], answer["usage"]["completion_tokens"]
            answers[index] = (text, tokens)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - start
    return answers, sum(tokens for _, tokens in answers), seconds


async def streamed(http: httpx.AsyncClient, server: Server, body: dict) -> tuple[str, int]:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    pieces, tokens = [], 0
    async with http.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                pieces.append(choice["text"])
    return "".join(pieces), tokens


def throughput(rounds: int, peer_python: Path) -> list[dict]:
    rows = []
    for weight_type in ("f32", "q8_0"):
        paths = ensure_model("stories110M", weight_type, DEFAULT_TOKENIZER)
        samples = {(engine, n): [] for engine in ("llamette", "llama.cpp") for n in CLIENTS}
        for round_index in range(rounds):
            for engine in ("llamette", "llama.cpp"):
                server = (llamette_server(paths["llamette"]) if engine == "llamette"
                          else llamacpp_server(peer_python, paths["llama.cpp"]))  # fmt: skip
                try:
                    bodies = [request_body(server.model, i) for i in range(REQUESTS)]
                    asyncio.run(load(server, 1, bodies[:1]))  # warm
                    for clients in CLIENTS:
                        _, tokens, seconds = asyncio.run(load(server, clients, bodies))
                        samples[engine, clients].append(tokens / seconds)
                        print(f"stories110M {weight_type} {engine} {clients} clients: "
                              f"{tokens / seconds:.1f} tok/s (round {round_index + 1})", flush=True)  # fmt: skip
                finally:
                    server.stop()
        for clients in CLIENTS:
            ours = statistics.median(samples["llamette", clients])
            theirs = statistics.median(samples["llama.cpp", clients])
            rows.append({"model": "stories110M", "weights": weight_type, "clients": clients,
                         "llamette_tok_s": round(ours, 1), "llamacpp_tok_s": round(theirs, 1),
                         "ratio": round(ours / theirs, 2)})  # fmt: skip
        single = next(r["llamette_tok_s"] for r in rows[-3:] if r["clients"] == 1)
        for row in rows[-3:]:
            row["vs_one_client"] = round(row["llamette_tok_s"] / single, 2)
    return rows


def stress() -> dict:
    """1,000 requests from 16 clients, each checked against the same request answered alone."""
    paths = ensure_model("stories15M", "f32", DEFAULT_TOKENIZER)
    server = llamette_server(paths["llamette"], ctx=None)  # stories15M's context: 256
    try:
        kinds = [request_body(server.model, i, temperature=0.8, seed=i + 1, max_tokens=32)
                 for i in range(16)]  # fmt: skip
        alone = [asyncio.run(load(server, 1, [body], stream=False))[0][0] for body in kinds]
        bodies = [kinds[i % 16] for i in range(1000)]
        first, _, seconds_1 = asyncio.run(load(server, 16, bodies[:500], stream=True))
        rss_500 = server.rss_mib()
        second, _, seconds_2 = asyncio.run(load(server, 16, bodies[500:], stream=True))
        rss_1000 = server.rss_mib()
        answers = first + second
        wrong = sum(answer != alone[i % 16] for i, answer in enumerate(answers))
        return {"requests": len(answers), "answered": sum(a is not None for a in answers),
                "differing_from_alone": wrong, "seconds": round(seconds_1 + seconds_2, 1),
                "rss_mib_after_500": round(rss_500, 1), "rss_mib_after_1000": round(rss_1000, 1)}  # fmt: skip
    finally:
        server.stop()


def markdown(rows: list[dict], stress_result: dict | None) -> str:
    lines = [
        f"Generated tokens per second, {REQUESTS} completions of {MAX_TOKENS} tokens shared "
        f"among the clients, {THREADS} threads on {cpu_name()}, {time.strftime('%Y-%m-%d')}, "
        "medians; llama.cpp is llama-cpp-python[server] on GGUF files of the same weights.",
        "",
        "| model | weights | clients | llamette serve | llama.cpp server | ratio | llamette vs 1 client |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['weights']} | {r['clients']} | {r['llamette_tok_s']} | "
                     f"{r['llamacpp_tok_s']} | {r['ratio']}x | {r['vs_one_client']}x |")  # fmt: skip
    if stress_result:
        s = stress_result
        lines += ["", f"Stress (stories15M F32): {s['answered']} of {s['requests']} requests "
                  f"answered, {s['differing_from_alone']} differing from the same request alone, "
                  f"in {s['seconds']} s; server RSS {s['rss_mib_after_500']} MiB after 500, "
                  f"{s['rss_mib_after_1000']} MiB after 1000."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds per engine (default 3)")
    parser.add_argument("--skip-stress", action="store_true", help="throughput only")
    parser.add_argument("--skip-throughput", action="store_true", help="stress only")
    args = parser.parse_args()
    os.environ.setdefault("LLAMETTE_THREADS", str(THREADS))
    rows = [] if args.skip_throughput else throughput(args.rounds, ensure_peer())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"throughput": rows}, indent=2) + "\n")
    stress_result = None if args.skip_stress else stress()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(
        json.dumps({"throughput": rows, "stress": stress_result}, indent=2) + "\n"
    )
    (RESULTS / "serve.md").write_text(markdown(rows, stress_result))
    print(markdown(rows, stress_result))


if __name__ == "__main__":
    main()
