"""Ray Serve replicas against one `llamette serve`: throughput with 16 clients, and Ray's cost per
request.

Usage: python benchmarks/ray_serve.py [--model stories110M] [--type f32] [--rounds 3]

Three deployments on this machine, started afresh in each round (rounds alternate between them,
figures are medians): `llamette serve --threads 2`, and `llamette serve --replicas N --threads 1`
for 1 and 2 replicas (Ray Serve on a local cluster). Throughput: 16 clients send 32 greedy
completions of 64 tokens in all (benchmarks/serve.py's load), generated tokens per second of
wall time. Per-request cost: the median time of 20 one-token completions sent one at a time.
The table goes to benchmarks/results/ray_serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from bench import DEFAULT_TOKENIZER, RESULTS, ensure_peer
from models import ensure_model
from serve import Server, free_port, load, request_body

DEPLOYMENTS = {  # name: flags of llamette serve
    "llamette serve --threads 2": ["--threads", "2"],
    "Ray Serve, 1 replica x 1 thread": ["--replicas", "1", "--threads", "1"],
    "Ray Serve, 2 replicas x 1 thread": ["--replicas", "2", "--threads", "1"],
}
CLIENTS, REQUESTS = 16, 32


def start(model, flags: list[str]) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "llamette", "serve", str(model), "-z", str(DEFAULT_TOKENIZER),
               "--port", str(port), *flags]  # fmt: skip
    started = Server(command, port)
    while httpx.get(f"{started.url}/health", timeout=60).status_code != 200:
        time.sleep(0.5)
    return started


def one_token_seconds(server: Server) -> float:
    """The median time of 20 one-token completions, one at a time."""
    times = []
    for index in range(20):
        begin = time.perf_counter()
        body = request_body(server.model, index, max_tokens=1)
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).raise_for_status()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="stories110M")
    parser.add_argument("--type", default="f32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = ensure_model(args.model, args.type, DEFAULT_TOKENIZER, ensure_peer())["llamette"]
    throughput: dict[str, list[float]] = {name: [] for name in DEPLOYMENTS}
    latency: dict[str, list[float]] = {name: [] for name in DEPLOYMENTS}
    for _ in range(args.rounds):
        for name, flags in DEPLOYMENTS.items():
            server = start(model, flags)
            try:
                one_token_seconds(server)  # warm
                bodies = [request_body(server.model, i) for i in range(REQUESTS)]
                _, tokens, seconds = asyncio.run(load(server, CLIENTS, bodies))
                throughput[name].append(tokens / seconds)
                latency[name].append(one_token_seconds(server))
            finally:
                server.stop()
    lines = [
        f"{args.model} {args.type.upper()}, {CLIENTS} clients, {REQUESTS} greedy completions of "
        f"64 tokens; medians of {args.rounds} alternating rounds ({time.strftime('%Y-%m-%d')}).",
        "",
        "| deployment | tok/s | vs llamette serve | one-token request (ms) |",
        "|---|---|---|---|",
    ]
    plain = statistics.median(throughput["llamette serve --threads 2"])
    for name in DEPLOYMENTS:
        tok_s = statistics.median(throughput[name])
        lines.append(f"| {name} | {tok_s:.1f} | {tok_s / plain:.2f}x | "
                     f"{statistics.median(latency[name]) * 1e3:.1f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    print(table)
    (RESULTS / "ray_serve.md").write_text(table)


if __name__ == "__main__":
    main()
