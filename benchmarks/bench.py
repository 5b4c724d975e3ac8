"""llamette against llama.cpp on this machine, side by side in one run.

For each model and weight type: decode tok/s (128 tokens, greedy), prefill tok/s (a 256-token
prompt), time to first token (process start to the first sampled token of a 16-token prompt,
warm caches), peak memory, and decode against the memory-bandwidth ceiling (the bytes of weights
a token reads, divided by the read bandwidth measured just before each pair of runs: the machine
is shared, and its bandwidth drifts); and against a read of the model file's own mapping (the same
bytes as the engines map them, from the page cache, which each model's files are read into afresh
first: settle_page_cache). Engines alternate run by run, each run in a fresh process; figures are
medians. Cold start: llamette's process start to its second sampled token (a prompt's
pass and a decode step, all that a run compiles) on an empty kernel cache, once.

With --baseline SRC (the src folder of another llamette checkout, e.g. a git worktree of an
earlier commit), that build runs too, alternating with the others, for a side-by-side comparison
of two builds; with --formats bin,gguf llamette also runs the GGUF files llama.cpp runs.

Usage: python benchmarks/bench.py [--models stories15M,stories110M,llama2-7b] [--types q4_k_m,...]
                                  [--runs 6] [--formats bin,gguf] [--baseline SRC]
Writes benchmarks/results/results.{md,json,png} (with --baseline: builds.{md,json} instead).
Models and llama.cpp's venv are made once and kept in ~/.cache/llamette-bench (or
$LLAMETTE_BENCH_DIR).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from models import cache_dir, ensure_model

from llamette.formats import load_weights
from llamette.weight_types import nbytes

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THREADS = os.cpu_count() or 1
PEER_PACKAGE = "llama-cpp-python[server]==0.3.36"
# Built from source for this CPU, without AMX: llama.cpp's AMX kernels crash on CPUs that have it
# (a segfault in decode; ggml-org/llama.cpp#20824). So it runs as on the CPUs most users have,
# with AVX-512 or AVX2 and its repacked weight layouts.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PEER_BUILD = {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CFLAGS": NO_AMX, "CXXFLAGS": NO_AMX}
DEFAULT_TOKENIZER = HERE.parent.parent / "shared" / "models" / "tokenizer.bin"
CONFIGS = {  # model: weight types measured
    "stories15M": ("f32", "q8_0"),
    "stories110M": ("f32", "q8_0", "q4_k_m"),
    "llama2-7b": ("q8_0", "q4_k_m", "q6_k"),
}
GGUF_ONLY = ("q4_k_m", "q6_k")  # llama.cpp's own files: no llama2.c file of these types


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default=",".join(CONFIGS), help="comma-separated, of: " + ", ".join(CONFIGS)
    )
    parser.add_argument("--types", help="comma-separated weight types (default: each model's: "
                        + "; ".join(f"{m} {', '.join(t)}" for m, t in CONFIGS.items()) + ")")  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=6, help="runs per engine (7B: half, at least 3)"
    )
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="tokenizer.bin embedded in the GGUF files (32000 pieces)")  # fmt: skip
    parser.add_argument("--formats", default="bin",
                        help="the files llamette runs: bin (llama2.c), gguf, or both")  # fmt: skip
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="another build's src folder, run alongside this one")  # fmt: skip
    args = parser.parse_args()
    formats = args.formats.split(",")
    if not set(formats) <= {"bin", "gguf"}:
        raise SystemExit(f"--formats: {args.formats!r} is not bin, gguf or both")
    if args.baseline and not (args.baseline / "llamette").is_dir():
        raise SystemExit(f"--baseline: {args.baseline} holds no llamette package")
    peer_python = ensure_peer()
    results = {"machine": machine(), "configs": []}
    print(f"read bandwidth: {results['machine']['bandwidth_gb_s']} GB/s (1 and {THREADS} threads)")
    results["machine"]["bandwidth_note"] = (
        "at the start; each model's ceiling uses its own measurements"
    )
    if args.baseline:
        results["baseline"] = str(args.baseline.resolve())
    for name in args.models.split(","):
        runs = max(3, args.runs // 2) if name == "llama2-7b" else args.runs
        for weight_type in CONFIGS[name]:
            if args.types and weight_type not in args.types.split(","):
                continue
            paths = ensure_model(name, weight_type, args.tokenizer, peer_python)
            for path in set(paths.values()):  # once, for every format measured
                settle_page_cache(path)
            for file_format in ["gguf"] if weight_type in GGUF_ONLY else formats:
                config = measure(name, weight_type, paths, peer_python, runs, file_format,
                                 args.baseline)  # fmt: skip
                results["configs"].append(config)
                print(summary_line(config), flush=True)
    RESULTS.mkdir(exist_ok=True)
    if args.baseline:  # a comparison of builds, not the results of record
        (RESULTS / "builds.json").write_text(json.dumps(results, indent=2) + "\n")
        (RESULTS / "builds.md").write_text(builds_markdown(results))
        print(builds_markdown(results))
        return
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "results.md").write_text(markdown(results))
    chart(results, RESULTS / "results.png")
    print(markdown(results))


def ensure_peer() -> Path:
    """llama-cpp-python in a venv of its own, built once for this CPU."""
    venv = cache_dir() / "peer-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"building {PEER_PACKAGE} in {venv} (several minutes, once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-cache-dir",
                        "--no-binary", "llama-cpp-python", PEER_PACKAGE, "numpy"],
                       check=True, env={**os.environ, **PEER_BUILD})  # fmt: skip
    return python


def bandwidth(threads: int) -> float:
    """GB/s read by `threads` threads: the median of three measurements."""
    return round(statistics.median(bandwidth_now(threads) for _ in range(3)), 1)


def bandwidth_now(threads: int, path: Path | None = None) -> float:
    """GB/s read by `threads` threads now: the best of seven reads of 2 GB, or of the file at
    path through a mapping of it."""
    file_arg = [str(path)] if path else []
    return float(run_json([sys.executable, str(HERE / "bandwidth.py"), str(threads), *file_arg]))


def settle_page_cache(path: Path) -> None:
    """Put the file in the page cache as a run after a reboot finds it: dropped, then read back from
    disk through a mapping. A file just written stays cached in the pieces it was written in; read
    from disk, Linux 6.x on ext4 or XFS caches it in pages of up to 2 MB, mapped whole, from which
    llamette decodes Llama-2-7B Q4_K_M about a tenth faster (llama.cpp reads its repacked copy, in
    memory of its own, and is unaffected). Both engines then read the file in one state."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # unless another process maps it
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mapped:
            pages = np.frombuffer(mapped, np.uint8)[:: mmap.PAGESIZE]
            int(pages.sum())  # a byte of every page: the kernel reads ahead in large pieces
            del pages
    finally:
        os.close(fd)


def machine() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": THREADS,
        "bandwidth_gb_s": {"1": bandwidth(1), str(THREADS): bandwidth(THREADS)},
        "date": time.strftime("%Y-%m-%d"),
    }


def measure(name: str, weight_type: str, paths: dict, peer_python: Path, runs: int,
            file_format: str = "bin", baseline: Path | None = None) -> dict:  # fmt: skip
    """One model and weight type: each engine's runs, alternating, each in a fresh process."""
    ours_file = paths["llamette"] if file_format == "bin" else paths["llama.cpp"]
    ours = [sys.executable, str(HERE / "run_llamette.py"), str(ours_file)]
    engines = {  # engine: (command, environment)
        "llamette": (ours, {}),
        "llama.cpp": ([str(peer_python), str(HERE / "run_llamacpp.py"), str(paths["llama.cpp"]),
                       str(THREADS)], {}),
    }  # fmt: skip
    if baseline:  # the other build, on the same file, with its own kernel cache
        engines["baseline"] = (ours, {"PYTHONPATH": str(baseline.resolve())})
    read_bandwidths = []  # GB/s, measured just before each round of runs
    file_bandwidths = []  # GB/s, the model file's mapping read just before each round
    samples = {engine: [] for engine in engines}
    ttft = {engine: [] for engine in engines}
    for run in range(runs):  # rotate which engine goes first
        read_bandwidths.append(bandwidth_now(THREADS))
        file_bandwidths.append(bandwidth_now(THREADS, ours_file))
        order = list(engines)
        for engine in order[run % len(order) :] + order[: run % len(order)]:
            command, env = engines[engine]
            samples[engine].append(json.loads(run_json(command, env)))
            ttft[engine].append(time_to_first_token(command + ["--ttft"], env))
    cold = {}
    for engine in ("llamette", "baseline") if baseline else ("llamette",):
        command, env = engines[engine]
        with tempfile.TemporaryDirectory() as empty_cache:  # llamette compiling everything
            cold[engine] = time_to_first_token(
                command + ["--cold"], {**env, "LLAMETTE_CACHE_DIR": empty_cache}
            )
    read_bandwidth = round(statistics.median(read_bandwidths), 1)

    bytes_per_token = weight_bytes_per_token(ours_file)
    ceiling = read_bandwidth * 1e9 / bytes_per_token
    config = {"model": name, "weight_type": weight_type, "file": file_format, "runs": runs,
              "weights_read_per_token_mb": round(bytes_per_token / 1e6, 1), "bandwidth_gb_s": read_bandwidth,
              "bandwidth_samples_gb_s": [round(b, 1) for b in read_bandwidths],
              "file_bandwidth_gb_s": round(statistics.median(file_bandwidths), 1),
              "ceiling_tok_s": round(ceiling, 1), "cold_first_token_s": round(cold["llamette"], 2)}  # fmt: skip
    for engine in samples:
        config[engine] = {
            "decode_tok_s": round(statistics.median(s["decode_tok_s"] for s in samples[engine]), 2),
            "prefill_tok_s": round(
                statistics.median(s["prefill_tok_s"] for s in samples[engine]), 1
            ),
            "first_token_s": round(statistics.median(ttft[engine]), 3),
            "peak_rss_mb": round(statistics.median(s["peak_rss"] for s in samples[engine]) / 1e6),
        }
        shares = [  # each run's decode speed against the ceiling measured just before it
            s["decode_tok_s"] * bytes_per_token / (gb_s * 1e9)
            for s, gb_s in zip(samples[engine], read_bandwidths, strict=True)
        ]
        config[engine]["ceiling_fraction"] = round(statistics.median(shares), 3)
        file_shares = [
            s["decode_tok_s"] * bytes_per_token / (gb_s * 1e9)
            for s, gb_s in zip(samples[engine], file_bandwidths, strict=True)
        ]
        config[engine]["file_ceiling_fraction"] = round(statistics.median(file_shares), 3)
        config[engine]["decode_tok_s_runs"] = [round(s["decode_tok_s"], 1) for s in samples[engine]]
        config[engine]["prefill_tok_s_runs"] = [
            round(s["prefill_tok_s"], 1) for s in samples[engine]
        ]
    for measure_name in ("decode_tok_s", "prefill_tok_s"):
        config[f"{measure_name.split('_')[0]}_ratio"] = round(
            config["llamette"][measure_name] / config["llama.cpp"][measure_name], 2
        )
    if baseline:
        config["baseline"]["cold_first_token_s"] = round(cold["baseline"], 2)
        for measure_name in ("decode_tok_s", "prefill_tok_s"):  # each run's against its neighbour's
            ratios = [ours / theirs for ours, theirs in zip(
                config["llamette"][f"{measure_name}_runs"], config["baseline"][f"{measure_name}_runs"],
                strict=True)]  # fmt: skip
            config[f"{measure_name.split('_')[0]}_vs_baseline"] = round(
                statistics.median(ratios), 3
            )
    return config


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights a decode step reads: every tensor, but one row of an unshared embedding."""
    weights = load_weights(path)
    total = 0
    for name, tensor in weights.tensors.items():
        size = nbytes(tensor)
        if name == "tok_embeddings.weight" and not weights.config.shared_classifier:
            size //= weights.config.vocab_size
        total += size
    return total


def run_json(command: list[str], env: dict | None = None) -> str:
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return done.stdout.strip().splitlines()[-1]


def time_to_first_token(command: list[str], env: dict | None = None) -> float:
    """Seconds from starting the process to its "first token" line."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, **(env or {})})  # fmt: skip
    line = process.stdout.readline()
    elapsed = time.perf_counter() - start
    process.wait()
    if "first token" not in line:
        raise SystemExit(f"{' '.join(command)} printed no first token")
    return elapsed


def summary_line(c: dict) -> str:
    ours, theirs = c["llamette"], c["llama.cpp"]
    line = (f"{c['model']} {c['weight_type']} ({c['file']}): decode {ours['decode_tok_s']} vs {theirs['decode_tok_s']} tok/s "
            f"(x{c['decode_ratio']}, {ours['ceiling_fraction']:.0%} of ceiling, {ours['file_ceiling_fraction']:.0%} of the file's read), "
            f"prefill {ours['prefill_tok_s']} "
            f"vs {theirs['prefill_tok_s']} (x{c['prefill_ratio']})")  # fmt: skip
    if "baseline" in c:
        line += (f"; against the baseline: decode x{c['decode_vs_baseline']}, prefill "
                 f"x{c['prefill_vs_baseline']}, cold start {c['cold_first_token_s']} vs "
                 f"{c['baseline']['cold_first_token_s']} s")  # fmt: skip
    return line


def builds_markdown(results: dict) -> str:
    """This build against the baseline, run by run: medians, and the median of the ratios of
    runs made one after the other."""
    m = results["machine"]
    lines = [
        f"This build against {results['baseline']}, alternating run by run, each run in a fresh "
        f"process: {m['cpu']}, {m['cores']} cores, {m['date']}. Ratio: the median of each run's "
        "against the baseline's run next to it (above 1: this build is faster). llama.cpp ran "
        "in the same rounds, for scale.",
        "",
        "| model | weights | file | decode tok/s this / baseline (ratio) | prefill tok/s this / baseline (ratio) "
        "| decode tok/s llama.cpp | cold start s this / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        ours, theirs = c["llamette"], c["baseline"]
        lines.append(
            f"| {c['model']} | {c['weight_type'].upper()} | {c['file']} "
            f"| {ours['decode_tok_s']} / {theirs['decode_tok_s']} (**{c['decode_vs_baseline']}**) "
            f"| {ours['prefill_tok_s']} / {theirs['prefill_tok_s']} (**{c['prefill_vs_baseline']}**) "
            f"| {c['llama.cpp']['decode_tok_s']} | {c['cold_first_token_s']} / {theirs['cold_first_token_s']} |"
        )
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    m = results["machine"]
    seen = [c["bandwidth_gb_s"] for c in results["configs"]]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; read bandwidth at the start {m['bandwidth_gb_s']['1']} GB/s "
        f"(1 thread), {m['bandwidth_gb_s'][str(m['cores'])]} GB/s ({m['cores']} threads); {m['date']}. "
        f"Medians of alternating runs; llama.cpp is llama-cpp-python {PEER_PACKAGE.split('==')[1]} "
        "built from source with -DGGML_NATIVE=ON and without AMX, timed by its own counters (no Python in them); llamette's "
        "figures include its Python loop and sampling. Ceiling: weight bytes per token over the "
        "read bandwidth measured before each pair of runs; the share is the median of each run's "
        "against its own measurement, the ceiling shown uses their median (this run: "
        f"{min(seen)} to {max(seen)} GB/s). File: the same share against a read of the model "
        "file's own mapping, measured the same way (the weights' bytes as the engines map them, "
        "from the page cache).",
        "",
        "| model | weights | decode tok/s llamette / llama.cpp (ratio) | ceiling tok/s at GB/s (llamette's share; "
        "file: GB/s, share) "
        "| prefill tok/s llamette / llama.cpp (ratio) | first token s llamette / llama.cpp "
        "| peak RSS MB llamette / llama.cpp | cold start s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        ours, theirs = c["llamette"], c["llama.cpp"]
        lines.append(
            f"| {c['model']} | {c['weight_type'].upper()} ({c['weights_read_per_token_mb']} MB/token) "
            f"| {ours['decode_tok_s']} / {theirs['decode_tok_s']} (**{c['decode_ratio']}**) "
            f"| {c['ceiling_tok_s']} at {c['bandwidth_gb_s']} ({ours['ceiling_fraction']:.0%}; file: "
            f"{c['file_bandwidth_gb_s']}, {ours['file_ceiling_fraction']:.0%}) "
            f"| {ours['prefill_tok_s']} / {theirs['prefill_tok_s']} (**{c['prefill_ratio']}**) "
            f"| {ours['first_token_s']} / {theirs['first_token_s']} "
            f"| {ours['peak_rss_mb']} / {theirs['peak_rss_mb']} | {c['cold_first_token_s']} |"
        )
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    labels = [f"{c['model']}\n{c['weight_type'].upper()}" for c in configs]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, measure_name, title in (
        (axes[0], "decode_tok_s", "decode"),
        (axes[1], "prefill_tok_s", "prefill"),
    ):
        positions = range(len(configs))
        width = 0.38
        axis.bar([p - width / 2 for p in positions], [c["llamette"][measure_name] / c["llama.cpp"][measure_name] for c in configs],
                 width, label="llamette", color="#2a7ab0")  # fmt: skip
        axis.bar(
            [p + width / 2 for p in positions],
            [1.0] * len(configs),
            width,
            label="llama.cpp",
            color="#bbbbbb",
        )
        if measure_name == "decode_tok_s":
            axis.plot(list(positions), [c["ceiling_tok_s"] / c["llama.cpp"][measure_name] for c in configs],
                      "k_", markersize=28, label="bandwidth ceiling")  # fmt: skip
        axis.set_xticks(list(positions), labels)
        axis.set_ylabel("tok/s relative to llama.cpp")
        axis.set_title(f"{title} (higher is better)")
        axis.legend(fontsize=8)
    figure.suptitle(
        f"llamette vs llama.cpp, {results['machine']['cores']} threads, {results['machine']['date']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension (the kernels' speed depends on it)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                "unknown CPU")  # fmt: skip
    flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    vectors = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                                         ("avx2", "AVX2")) if flag in flags]  # fmt: skip
    if "AVX-512" in vectors and "AVX2" in vectors:
        vectors.remove("AVX2")
    return f"{name} ({', '.join(vectors)})" if vectors else name


if __name__ == "__main__":
    main()
