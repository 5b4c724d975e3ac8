"""One llamette measurement, run in a fresh process: prints a JSON line.

Usage: python run_llamette.py MODEL          prefill, decode and peak memory
       python run_llamette.py MODEL --ttft   a line as soon as the first token is sampled
       python run_llamette.py MODEL --cold   a line as soon as the second token is sampled (a
                                             prompt's pass and a decode step: on an empty
                                             kernel cache, all a run compiles)
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from llamette import Transformer
from llamette.kernels.sampling import argmax

PROMPT_TOKENS = 256
DECODE_TOKENS = 128
TTFT_PROMPT_TOKENS = 16


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    model = Transformer.load(sys.argv[1])
    prompt = np.random.default_rng(0).integers(3, model.config.vocab_size, PROMPT_TOKENS).tolist()
    prompt[0] = 1
    if "--ttft" in sys.argv or "--cold" in sys.argv:
        token = int(argmax(model.prefill(prompt[:TTFT_PROMPT_TOKENS], 0)))
        if "--cold" in sys.argv:
            argmax(model.forward(token, TTFT_PROMPT_TOKENS))
        print("first token", flush=True)
        return

    # warm-up: load the compiled kernels from Numba's cache (llama.cpp's timings exclude loading)
    model.prefill(prompt[:8], 0)
    for pos in range(8, 11):
        model.forward(prompt[pos], pos)

    start = time.perf_counter()
    model.prefill(prompt, 0)
    prefill_seconds = time.perf_counter() - start

    # decode: greedy, one token at a time after a one-token prompt, sampling included
    token = int(argmax(model.prefill([1], 0)))
    start = time.perf_counter()
    for pos in range(1, DECODE_TOKENS + 1):
        token = int(argmax(model.forward(token, pos)))
    decode_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "prefill_tok_s": PROMPT_TOKENS / prefill_seconds,
                "decode_tok_s": DECODE_TOKENS / decode_seconds,
                "peak_rss": peak_rss_bytes(),
            }
        )
    )


if __name__ == "__main__":
    main()
