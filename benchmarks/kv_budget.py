"""KV memory taken as positions are written: `llamette serve` under a budget, many clients.

Usage: python benchmarks/kv_budget.py [--model llama2-7b] [--type q8_0] [--clients 16]
                                      [--tokens 64] [--budget POSITIONS] [--ctx N]

Starts `llamette serve` with --max-batch 16 (and --kv-budget if given; by default the server's
own: what fits in half the memory available beside the weights), then sends --clients greedy
completions at once (prompts of about 16 tokens, --tokens generated each, not streamed) while
polling /metrics. Reported: resident memory once the kernels are ready and at the end, the
budget, the most requests running and KV positions held at once, preemptions, the wall time and
generated tokens per second; then each request is sent again alone, and its answer must be the
same. The table goes to benchmarks/results/kv_budget.md (appended, one row per run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx
from bench import DEFAULT_TOKENIZER, RESULTS, THREADS, ensure_peer
from models import ensure_model
from prometheus_client.parser import text_string_to_metric_families
from serve import Server, free_port


def start(model: Path, budget: int | None, ctx: int | None) -> Server:
    port = free_port()
    command = [sys.executable, "-m", "llamette", "serve", str(model), "-z", str(DEFAULT_TOKENIZER),
               "--port", str(port), "--max-batch", "16", "--threads", str(THREADS)]  # fmt: skip
    command += ["--kv-budget", str(budget)] if budget else []
    command += ["--ctx", str(ctx)] if ctx else []
    started = Server(command, port)
    while httpx.get(f"{started.url}/health", timeout=60).status_code == 503:  # kernels loading
        time.sleep(0.5)
    return started


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=60).text
    return {family.name: family.samples[0].value
            for family in text_string_to_metric_families(text)
            if len(family.samples) == 1}  # fmt: skip


def body(model: str, index: int, tokens: int) -> dict:
    return {"model": model, "prompt": f"Once upon a time, a child named number {index} went",
            "max_tokens": tokens, "temperature": 0}  # fmt: skip


async def load(server: Server, clients: int, tokens: int) -> dict:
    """Every client's request at once, /metrics polled meanwhile."""
    most = {"running": 0.0, "held": 0.0}

    async def poll(done: asyncio.Event) -> None:
        while not done.is_set():
            now = await asyncio.to_thread(gauges, server.url)
            most["running"] = max(most["running"], now["llamette_requests_running"])
            most["held"] = max(most["held"], now["llamette_kv_positions_used"])
            await asyncio.sleep(0.2)

    async with httpx.AsyncClient(timeout=3600) as http:
        done = asyncio.Event()
        poller = asyncio.create_task(poll(done))
        start = time.perf_counter()
        answers = await asyncio.gather(*(
            http.post(f"{server.url}/v1/completions", json=body(server.model, i, tokens))
            for i in range(clients)
        ))  # fmt: skip
        seconds = time.perf_counter() - start
        done.set()
        await poller
    texts = [answer.json()["choices"][0]["text"] for answer in answers]
    generated = sum(answer.json()["usage"]["completion_tokens"] for answer in answers)
    return {"texts": texts, "seconds": seconds, "tok_s": generated / seconds, **most}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--type", default="q8_0")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, help="--kv-budget (default: the server's)")
    parser.add_argument("--ctx", type=int, help="--ctx (default: the model's context)")
    args = parser.parse_args()

    paths = ensure_model(args.model, args.type, DEFAULT_TOKENIZER, ensure_peer())
    server = start(paths["llamette"], args.budget, args.ctx)
    try:
        rss_ready = server.rss_mib()
        budget = gauges(server.url)["llamette_kv_budget_positions"]
        result = asyncio.run(load(server, args.clients, args.tokens))
        rss_end = server.rss_mib()
        preempted = gauges(server.url)["llamette_preemptions"]
        differing = 0
        for i, text in enumerate(result["texts"]):
            alone = httpx.post(f"{server.url}/v1/completions", timeout=3600,
                               json=body(server.model, i, args.tokens)).json()  # fmt: skip
            differing += alone["choices"][0]["text"] != text
    finally:
        server.stop()
    row = (
        f"| {args.model} {args.type.upper()} | {args.ctx or 'model'} | {int(budget)} | "
        f"{args.clients} x {args.tokens} | {rss_ready:.0f} | {rss_end:.0f} | "
        f"{result['running']:.0f} | {result['held']:.0f} | {preempted:.0f} | "
        f"{result['seconds']:.1f} | {result['tok_s']:.1f} | {differing} |"
    )
    print(row)
    out = RESULTS / "kv_budget.md"
    if not out.exists():
        out.write_text(
            "| model | ctx | budget (positions) | requests x tokens | RSS ready (MiB) | "
            "RSS end (MiB) | most running | most positions held | preemptions | seconds | "
            "tok/s | answers differing from alone |\n|" + "---|" * 12 + "\n"
        )
    with out.open("a") as table:
        table.write(row + "\n")


if __name__ == "__main__":
    main()
