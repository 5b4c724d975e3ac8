"""What each function costs to compile: a cold run (an empty kernel cache) of one model.

Usage: python benchmarks/compile_times.py [MODEL] [--top N] [--after OTHER_MODEL ...] [--runs N]

Runs, in a fresh process with an empty LLAMETTE_CACHE_DIR, what `llamette run` runs first (a
prompt's pass, a decode step, a draw): once as a first run goes (with its helper process, see
llamette.ahead), for the time to the first draw; once without the helper, recording Numba's
compile events, to print each compiled function's own time (its compile less the compiles it set
off) and its total, the largest first. With --after, the cache holds OTHER_MODEL's kernels first
(the bundled model's: a new weight type's first use, as a user meets it after the README's first
command; --after again adds another model's, run in that order); with --runs N, the time to the
first draw is the median of N runs; --top 0 prints that alone (no run without the helper).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "llamette" / "bundled" / "model.bin"

MEASURE = textwrap.dedent("""
    import json, sys, time
    from numba.core import event

    spans = []  # (name, start, end, depth)
    stack = []

    class Recorder(event.Listener):
        def on_start(self, e):
            stack.append((e.data["dispatcher"].py_func.__qualname__, time.perf_counter()))
        def on_end(self, e):
            name, start = stack.pop()
            spans.append((name, start, time.perf_counter(), len(stack)))

    event.register("numba:compile", Recorder())
    start = time.perf_counter()
    from llamette import Sampler, Transformer
    model = Transformer.load(sys.argv[1])
    model.prefill([1, 2, 3], 0)
    logits = model.forward(4, 3)
    Sampler(model.config.vocab_size, temperature=1.0, topp=0.9, seed=1).sample(logits)
    print(json.dumps({"seconds": time.perf_counter() - start, "spans": spans}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(BUNDLED))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--after", action="append", default=[],
                        help="a model whose kernels the cache holds first (repeatable)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        warmed = cache if args.after else None
        for other in args.after:
            measured_run(other, helper=True, cache=cache)
        seconds = [cold_run(args.model, True, warmed)["seconds"] for _ in range(args.runs)]
        after = f" after {', '.join(args.after)}'s" if args.after else ""
        print(f"{args.model}: {statistics.median(seconds):.1f} s to the first draw{after}, as a "
              f"first run goes (its helper process compiling beside it, llamette.ahead; "
              f"{', '.join(f'{s:.1f}' for s in seconds)})")  # fmt: skip
        if args.top == 0:
            return
        result = cold_run(args.model, helper=False, warmed=warmed)
    spans = result["spans"]
    own = {}
    for i, (name, start, end, depth) in enumerate(spans):
        inner = sum(e - s for _, s, e, d in spans[:i] if d == depth + 1 and s >= start and e <= end)
        total, mine = own.get(name, (0.0, 0.0))
        own[name] = (total + end - start, mine + end - start - inner)
    print(f"{args.model}: {result['seconds']:.1f} s to the first draw without the helper, "
          f"{len(spans)} compiles, {sum(e - s for _, s, e, d in spans if d == 0):.1f} s compiling")  # fmt: skip
    print(f"{'function':60} {'own s':>8} {'total s':>8}")
    for name, (total, mine) in sorted(own.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{name:60} {mine:8.2f} {total:8.2f}")


def cold_run(model: str, helper: bool, warmed: str | None = None) -> dict:
    """MEASURE's result in a fresh process on an empty kernel cache, or on a copy of `warmed`."""
    with tempfile.TemporaryDirectory() as cache:
        if warmed:
            shutil.copytree(warmed, cache, dirs_exist_ok=True)
        return measured_run(model, helper, cache)


def measured_run(model: str, helper: bool, cache: str) -> dict:
    """MEASURE's result in a fresh process on the kernel cache `cache`."""
    env = {
        **os.environ,
        "LLAMETTE_CACHE_DIR": cache,
        "LLAMETTE_COMPILE_AHEAD": "1" if helper else "0",
    }
    done = subprocess.run([sys.executable, "-c", MEASURE, model], capture_output=True,
                          text=True, env=env)  # fmt: skip
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.splitlines()[-1])


if __name__ == "__main__":
    main()
