"""Decode beside a busy program: llamette's default threads against `--threads 1` and llama.cpp.

Usage: python benchmarks/busy.py [--runs N] [--model stories110M] [--type q8_0]

Each condition (a quiet machine, then one busy loop running beside) times decode in fresh
processes, the engines alternating: llamette with its default threads (as many as cores,
fewer where its passes find fewer faster), llamette forced to one thread, and llama.cpp with as
many threads as cores and with one. Medians of the runs; the table goes to
benchmarks/results/busy.md and busy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench import DEFAULT_TOKENIZER, THREADS, ensure_peer, run_json
from models import ensure_model

HERE = Path(__file__).resolve().parent
BUSY_LOOP = "while True: pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="stories110M")
    parser.add_argument("--type", default="q8_0")
    args = parser.parse_args()
    peer = ensure_peer()
    path = ensure_model(args.model, args.type, DEFAULT_TOKENIZER, peer)["llama.cpp"]
    ours = [sys.executable, str(HERE / "run_llamette.py"), str(path)]
    engines = {  # engine: (command, environment)
        "llamette": (ours, {}),
        "llamette --threads 1": (ours, {"NUMBA_NUM_THREADS": "1"}),
        f"llama.cpp {THREADS} threads": ([str(peer), str(HERE / "run_llamacpp.py"), str(path),
                                          str(THREADS)], {}),
        "llama.cpp 1 thread": ([str(peer), str(HERE / "run_llamacpp.py"), str(path), "1"], {}),
    }  # fmt: skip
    results = {"model": args.model, "type": args.type, "runs": args.runs, "threads": THREADS}
    for condition in ("quiet", "one busy process"):
        busy = None
        if condition != "quiet":
            busy = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        try:
            samples = {engine: [] for engine in engines}
            for run in range(args.runs):
                order = list(engines)
                for engine in order[run % len(order) :] + order[: run % len(order)]:
                    command, env = engines[engine]
                    samples[engine].append(json.loads(run_json(command, env))["decode_tok_s"])
        finally:
            if busy is not None:
                busy.kill()
        results[condition] = {
            engine: {
                "decode_tok_s": round(statistics.median(s), 1),
                "runs": [round(x, 1) for x in s],
            }
            for engine, s in samples.items()
        }
        print(condition, {e: r["decode_tok_s"] for e, r in results[condition].items()}, flush=True)
    out = HERE / "results"
    (out / "busy.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "busy.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results: dict) -> str:
    engines = list(results["quiet"])
    lines = [f"{results['model']} {results['type'].upper()} (GGUF, the same file for both engines), "
             f"decode tok/s, medians of {results['runs']} alternating runs, "
             f"{os.cpu_count()} cores:", "",
             "| condition | " + " | ".join(engines) + " | llamette / --threads 1 | "
             "llamette / llama.cpp |", "|---" * (len(engines) + 3) + "|"]  # fmt: skip
    for condition in ("quiet", "one busy process"):
        r = {e: results[condition][e]["decode_tok_s"] for e in engines}
        llama_cpp = r[f"llama.cpp {results['threads']} threads"]
        lines.append(f"| {condition} | " + " | ".join(f"{r[e]}" for e in engines)
                     + f" | {r['llamette'] / r['llamette --threads 1']:.2f}"
                     f" | {r['llamette'] / llama_cpp:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
