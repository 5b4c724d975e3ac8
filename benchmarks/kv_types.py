"""KV-cache types side by side: decode speed deep into the context, memory, and KL from float32.

Usage: python benchmarks/kv_types.py [--model stories110M] [--type f32] [--context 960]
                                     [--rounds 5] [--baseline OLD/src]

For each cache type (f32, f16, q8_0), a fresh process loads the model, feeds --context tokens
(passes of 32 rows; at most the model's context less 32), then times 32 decode steps there, where attention reads the most cache;
rounds alternate between the types (and, with --baseline, an older build's float32 cache), and
the figures are medians. KL: over the prompt's positions, the mean KL divergence of each type's
next-token distributions from the float32 cache's, on the benchmark model (random weights) and
on the bundled model (trained; 256 positions). The table is appended to
benchmarks/results/kv_types.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench import DEFAULT_TOKENIZER, RESULTS, THREADS, ensure_peer
from models import ensure_model

TYPES = ("f32", "f16", "q8_0")
DECODE_STEPS = 32
BUNDLED = Path(__file__).resolve().parent.parent / "src" / "llamette" / "bundled" / "model.bin"


def worker(model: str, kv_type: str, context: int) -> dict:
    """In this process: decode seconds per token after `context` positions, and the logits."""
    from llamette.kernels import SMALL_BATCH, set_threads
    from llamette.model import Transformer

    set_threads(THREADS)
    options = {} if kv_type == "f32" else {"kv_type": kv_type}  # an older build has no kv_type
    transformer = Transformer.load(model, **options)
    context = min(context, transformer.config.seq_len - DECODE_STEPS)
    transformer.warm_up()
    tokens = list(np.random.default_rng(0).integers(3, 1000, context + DECODE_STEPS))
    for start in range(0, context, SMALL_BATCH):
        batch = tokens[start : min(start + SMALL_BATCH, context)]
        transformer.forward_batch(batch, list(range(start, start + len(batch))), [0] * len(batch))
    begin = time.perf_counter()
    for pos in range(context, context + DECODE_STEPS):
        transformer.forward(int(tokens[pos]), pos)
    return {"seconds_per_token": (time.perf_counter() - begin) / DECODE_STEPS}


def run_worker(model: Path, kv_type: str, context: int, source: Path | None) -> dict:
    env = os.environ | ({"PYTHONPATH": str(source)} if source else {})
    command = [sys.executable, __file__, "--worker", str(model), kv_type, str(context)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def mean_kl(model: Path, positions: int) -> dict[str, float]:
    """Each type's mean KL from the float32 cache's next-token distributions, over a random
    prompt of `positions` tokens fed in passes of 32 rows."""
    from llamette.kernels import SMALL_BATCH
    from llamette.model import Transformer

    tokens = list(np.random.default_rng(1).integers(3, 500, positions))

    def log_softmax_of(kv_type: str) -> np.ndarray:
        transformer = Transformer.load(model, kv_type=kv_type)
        logits = [transformer.forward_batch(tokens[s : s + SMALL_BATCH],
                                            list(range(s, min(s + SMALL_BATCH, positions))),
                                            [0] * len(tokens[s : s + SMALL_BATCH]))
                  for s in range(0, positions, SMALL_BATCH)]  # fmt: skip
        logits = np.concatenate(logits).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

    exact = log_softmax_of("f32")
    return {kv_type: float((np.exp(exact) * (exact - log_softmax_of(kv_type))).sum(1).mean())
            for kv_type in TYPES}  # fmt: skip


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="stories110M")
    parser.add_argument("--type", default="f32", help="the model's weight type")
    parser.add_argument("--context", type=int, default=960)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="an older build's src folder (f32 only)")
    args = parser.parse_args()

    model = ensure_model(args.model, args.type, DEFAULT_TOKENIZER, ensure_peer())["llamette"]
    runs = [(kv_type, None) for kv_type in TYPES]
    runs += [("f32", args.baseline)] if args.baseline else []
    seconds: dict[tuple, list[float]] = {run: [] for run in runs}
    for _ in range(args.rounds):
        for kv_type, source in runs:
            result = run_worker(model, kv_type, args.context, source)
            seconds[kv_type, source].append(result["seconds_per_token"])
    kl_random = mean_kl(model, min(args.context, 512))
    kl_trained = mean_kl(BUNDLED, 256)

    from llamette.model import Transformer
    from llamette.server import kv_position_bytes

    config = Transformer.load(model).config
    lines = [
        f"{args.model} {args.type.upper()} ({THREADS} threads), decode after {args.context} "
        f"positions, medians of {args.rounds} rounds of {DECODE_STEPS} steps "
        f"({time.strftime('%Y-%m-%d')}); KL from the float32 cache's next-token "
        "distributions: the benchmark model (random weights) and the bundled model (trained).",
        "",
        "| cache | KV bytes per position | decode ms/token | tok/s | vs f32 | KL (random) | "
        "KL (bundled) |",
        "|---|---|---|---|---|---|---|",
    ]
    f32 = statistics.median(seconds["f32", None])
    for kv_type, source in runs:
        median = statistics.median(seconds[kv_type, source])
        name = kv_type if source is None else "f32, baseline build"
        kl = (f"{kl_random[kv_type]:.2e} | {kl_trained[kv_type]:.2e}" if source is None
              else "- | -")  # fmt: skip
        lines.append(
            f"| {name} | {kv_position_bytes(config, kv_type)} | {median * 1e3:.2f} | "
            f"{1 / median:.1f} | {f32 / median:.3f}x | {kl} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    with (RESULTS / "kv_types.md").open("a") as results:
        results.write(table + "\n")


if __name__ == "__main__":
    main()
