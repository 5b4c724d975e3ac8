"""One llama.cpp measurement through llama-cpp-python, run in the peer's venv: prints a JSON line.

Usage: python run_llamacpp.py MODEL.gguf THREADS          prefill, decode and peak memory
       python run_llamacpp.py MODEL.gguf THREADS --ttft   a line once the first token is sampled
Speeds are llama.cpp's own timings (llama_perf_context: no Python in them), the strictest figure
to compare with.
"""

from __future__ import annotations

import json
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

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
    path, threads = sys.argv[1], int(sys.argv[2])
    llm = Llama(
        model_path=path,
        n_ctx=PROMPT_TOKENS,
        n_batch=PROMPT_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        no_perf=False,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = np.random.default_rng(0).integers(3, vocab, PROMPT_TOKENS).tolist()
    prompt[0] = 1
    if "--ttft" in sys.argv:
        llm.eval(prompt[:TTFT_PROMPT_TOKENS])
        np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)))
        print("first token", flush=True)
        return

    llama_cpp.llama_perf_context_reset(llm.ctx)
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm.ctx)  # llama.cpp adds a batch's time to its counters here
    prefill = llama_cpp.llama_perf_context(llm.ctx)

    llm.reset()
    llm.eval([1])
    token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    llama_cpp.llama_perf_context_reset(llm.ctx)
    for _ in range(DECODE_TOKENS):
        llm.eval([token])
        token = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))
    decode = llama_cpp.llama_perf_context(llm.ctx)
    print(
        json.dumps(
            {
                "prefill_tok_s": prefill.n_p_eval / (prefill.t_p_eval_ms / 1000),
                "decode_tok_s": decode.n_eval / (decode.t_eval_ms / 1000),
                "peak_rss": peak_rss_bytes(),
            }
        )
    )


if __name__ == "__main__":
    main()
