"""Compiling on two cores: while a process compiles a model's forward pass (a first run, with an
empty kernel cache), a helper process compiles the kernels the pass reaches last into the cache,
where the first process then finds them.

Numba compiles one function at a time under a process-wide lock, and the forward pass takes its
kernels in order: the products first (the longest), then rotary embedding, the KV cache's store,
attention, the residual's addition and the feed-forward's gate; the sampler after the pass. The
helper starts at the model's first compile and takes those, the longest first (attention, the
gate); a kernel it has not finished by the time the pass reaches it, the pass compiles itself,
as it would alone.

Usage (the helper): python -m llamette.ahead MODEL_FILE KV_TYPE fast|exact
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys

from numba.core import event

SWITCH = "LLAMETTE_COMPILE_AHEAD"  # "0": no helper


class CompileAhead(event.Listener):
    """One model's helper: started, at most once, by the first compile while `watching`."""

    def __init__(self, model_file: str, kv_type: str, exact: bool):
        # a llama2.c or GGUF file, whose types the helper loads again; not a model from
        # elsewhere, and not from the helper itself (LLAMETTE_COMPILE_AHEAD=0)
        wanted = os.path.isfile(model_file) and os.environ.get(SWITCH) != "0"
        self.command = [sys.executable, "-m", "llamette.ahead", model_file, kv_type,
                        "exact" if exact else "fast"] if wanted else None  # fmt: skip
        self.helper: subprocess.Popen | None = None

    @contextlib.contextmanager
    def watching(self):
        """While the block runs, a compile starts the helper (if it has not started yet)."""
        if self.command is None or self.helper is not None:
            yield
            return
        event.register("numba:compile", self)
        try:
            yield
        finally:
            event.unregister("numba:compile", self)

    def on_start(self, _: event.Event) -> None:
        if self.helper is None:
            self.helper = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env={**os.environ, SWITCH: "0"},
            )  # fmt: skip
            atexit.register(_stop, self.helper)  # its work is only worth this process's run

    def on_end(self, _: event.Event) -> None:
        pass


def _stop(helper: subprocess.Popen) -> None:
    if helper.poll() is None:
        helper.kill()
    helper.wait()


def compile_last_kernels(config, buffers, kv_cache, exact: bool) -> None:
    """Compile (by running each once, on a model's buffers and KV cache) the kernels that its
    forward pass reaches last, for the argument types the pass gives them, the longest first;
    then the sampler's."""
    import numpy as np

    from llamette.kernels.layers import add, attention, rope, store_kv, swiglu
    from llamette.sampler import Sampler

    b, c = buffers, config
    first = np.zeros(1, np.int64)  # the rows' positions and slots: rows[1] and rows[2] of the pass
    attention(b.attended[:1], b.q[:1], kv_cache, 0, first, first, c.n_heads, b.scores, exact)
    swiglu(b.gate[:1], b.up[:1], exact)
    add(b.x[:1], b.out[:1])
    rope(b.q[:1], b.k[:1], b.cos[:1], b.sin[:1])
    store_kv(kv_cache, 0, first, first, b.k[:1], b.v[:1])
    Sampler(c.vocab_size, temperature=1.0, topp=0.9, seed=1).sample(
        np.zeros(c.vocab_size, np.float32)
    )


def main(argv: list[str]) -> int:
    """The helper: the model file's buffers and KV cache as a Transformer makes them (without its
    weights' typed lists, which the first process compiles), then compile_last_kernels."""
    from llamette.formats import load_weights
    from llamette.model import Buffers, new_kv_cache
    from llamette.weight_types import smallest_input_group

    model_file, kv_type, flavour = argv
    weights, exact = load_weights(model_file), flavour == "exact"
    config = weights.config
    buffers = Buffers.for_config(config, 1, smallest_input_group(weights.tensors.values()), False)
    compile_last_kernels(config, buffers, new_kv_cache(config, 1, kv_type, exact), exact)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
