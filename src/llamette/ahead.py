"""Compiling on two cores: while a process compiles a model's forward pass (a first run, with an
empty kernel cache), a helper process compiles some of its kernels into the cache, where the
first process then finds them.

Numba compiles one function at a time under a process-wide lock, and the forward pass takes its
kernels in order: the products first (the longest), then rotary embedding, the KV cache's store,
attention, the residual's addition and the feed-forward's gate; the sampler after the pass. The
helper starts at the model's first compile. For a model whose products have one weight type, it
takes the kernels the pass reaches last, the longest first (attention, the gate); a kernel it has
not finished by the time the pass reaches it, the pass compiles itself, as it would alone. Where
the model has no int8-family weights, it then compiles the input quantization that those types
share, for a next model, if the first process has not ended by then (it stops the helper). A
model of several weight types (Q4_K_M: Q4_K and Q6_K) shares out their products instead: the
helper compiles attention and every other type's products while the first process compiles the
rest, then waits for the helper's products before it compiles the pass.

Usage (the helper): python -m llamette.ahead MODEL_FILE KV_TYPE fast|exact [WEIGHT_TYPE...]
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

from numba.core import event

SWITCH = "LLAMETTE_COMPILE_AHEAD"  # "0": no helper
T = TypeVar("T")


class CompileAhead(event.Listener):
    """One model's helper: started, at most once, by the first compile while `watching`."""

    def __init__(self, model_file: str, kv_type: str, exact: bool,
                 helper_products: tuple[str, ...] = ()):  # fmt: skip
        # a llama2.c or GGUF file, whose types the helper loads again; not a model from
        # elsewhere, and not from the helper itself (LLAMETTE_COMPILE_AHEAD=0)
        wanted = os.path.isfile(model_file) and os.environ.get(SWITCH) != "0"
        self.command = [sys.executable, "-m", "llamette.ahead", model_file, kv_type,
                        "exact" if exact else "fast"] if wanted else None  # fmt: skip
        self.helper_products = helper_products  # weight types whose products the helper takes
        self.helper: subprocess.Popen | None = None
        self._sharing = False  # whether the helper, once started, takes helper_products

    @contextlib.contextmanager
    def watching(self, share_products: bool = False):
        """While the block runs, a compile starts the helper (if it has not started yet), with
        the products to share out if share_products (a cold start's first compile, before the
        pass: see forward_compiled)."""
        if self.command is None or self.helper is not None:
            yield
            return
        self._sharing = share_products and bool(self.helper_products)
        event.register("numba:compile", self)
        try:
            yield
        finally:
            event.unregister("numba:compile", self)

    def on_start(self, _: event.Event) -> None:
        if self.helper is None:
            products = list(self.helper_products) if self._sharing else []
            self.helper = subprocess.Popen(
                self.command + products, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if products else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, env={**os.environ, SWITCH: "0"},
            )  # fmt: skip
            atexit.register(_stop, self.helper)  # its work is only worth this process's run

    def on_end(self, _: event.Event) -> None:
        pass

    def forward_compiled(self, compile_own_share: Callable[[], None],
                         compile_forward: Callable[[], T]) -> T:  # fmt: skip
        """compile_forward's result; where the helper shares out the products (it started
        sharing), compile_own_share first, then wait for the helper's products, which the pass
        then loads from the cache (or compiles itself, if the helper stopped short)."""
        if self._sharing and self.helper is not None:
            self._sharing = False
            compile_own_share()
            self.helper.stdout.readline()  # its line once its products are cached, or its end
        with self.watching():
            return compile_forward()


def shared_products(weights) -> tuple[list, list]:
    """The weights the forward pass multiplies by, the first of each type in the order the pass
    reaches them, split between a cold start's two processes: alternately, this process first
    (the helper compiles attention besides); none for the helper if there is one type."""
    from llamette.model import layers_of
    from llamette.weight_types import weight_type

    first_of_type = {}
    for layer in layers_of(weights):
        for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w3, layer.w2):
            first_of_type.setdefault(weight_type(w).NAME, w)
    first_of_type.setdefault(weight_type(weights.classifier).NAME, weights.classifier)
    firsts = list(first_of_type.values())
    return firsts[0::2], firsts[1::2]


def compile_products(weights, inputs, exact: bool) -> None:
    """Compile (by running each once, on a row of zeros) the products with these weights, for
    the argument types the forward pass gives them."""
    import numpy as np

    from llamette.weight_types import weight_type

    for w in weights:
        rows, cols = w.shape
        inputs.held[0] = 0  # a new input (kernels.int8.new_input)
        weight_type(w).product(np.zeros((1, rows), np.float32), np.zeros((1, cols), np.float32),
                               w, inputs, exact)  # fmt: skip
    inputs.held[0] = 0


def _stop(helper: subprocess.Popen) -> None:
    if helper.poll() is None:
        helper.kill()
    helper.wait()


def compile_last_kernels(config, buffers, kv_cache, exact: bool) -> None:
    """Compile (by running each once, on a model's buffers and KV cache) the kernels that its
    forward pass reaches last, for the argument types the pass gives them, the longest first;
    then the sampler's."""
    compile_attention(config, buffers, kv_cache, exact)
    compile_steps(buffers, kv_cache, exact)
    compile_sampler(config)


def compile_attention(config, buffers, kv_cache, exact: bool) -> None:
    import numpy as np

    from llamette.kernels.layers import attention

    b, first = buffers, np.zeros(1, np.int64)  # the rows' positions and slots: rows[1], rows[2]
    attention(b.attended[:1], b.q[:1], kv_cache, 0, first, first, config.n_heads, b.scores,
              exact)  # fmt: skip


def compile_steps(buffers, kv_cache, exact: bool) -> None:
    """The feed-forward's gate, the residual's addition, rotary embedding, the KV cache's store."""
    import numpy as np

    from llamette.kernels.layers import add, rope, store_kv, swiglu

    b, first = buffers, np.zeros(1, np.int64)
    swiglu(b.gate[:1], b.up[:1], exact)
    add(b.x[:1], b.out[:1])
    rope(b.q[:1], b.k[:1], b.cos[:1], b.sin[:1])
    store_kv(kv_cache, 0, first, first, b.k[:1], b.v[:1])


def compile_input_quantization() -> None:
    """The quantization of a product's input that every int8-family weight type shares
    (kernels.int8.quantized), for the argument types the forward pass gives it: a helper whose
    model has none of those types has the time to spare, and a first run of such a type then
    loads it."""
    import numpy as np

    from llamette.kernels.int8 import Int8Inputs, quantized

    quantized(np.zeros((1, 256), np.float32), Int8Inputs.sized(1, 256), np.int64(32))


def compile_sampler(config) -> None:
    import numpy as np

    from llamette.sampler import Sampler

    Sampler(config.vocab_size, temperature=1.0, topp=0.9, seed=1).sample(
        np.zeros(config.vocab_size, np.float32)
    )


def main(argv: list[str]) -> int:
    """The helper: the model file's buffers and KV cache as a Transformer makes them (without its
    weights' typed lists, which the first process compiles), then compile_last_kernels (and the
    input quantization of the int8 family, where the model has none of it); or, given weight
    types, attention and those types' products (then a line on stdout), then the sampler."""
    from llamette.formats import load_weights
    from llamette.model import Buffers, new_kv_cache
    from llamette.weight_types import smallest_input_group, weight_type

    model_file, kv_type, flavour, *product_types = argv
    weights, exact = load_weights(model_file), flavour == "exact"
    config = weights.config
    buffers = Buffers.for_config(config, 1, smallest_input_group(weights.tensors.values()), False)
    kv_cache = new_kv_cache(config, 1, kv_type, exact)
    if not product_types:
        compile_last_kernels(config, buffers, kv_cache, exact)
        mine, others = shared_products(weights)
        if not any(hasattr(weight_type(w), "input_group_size") for w in mine + others):
            compile_input_quantization()  # for a next model, of another type
        return 0
    compile_attention(config, buffers, kv_cache, exact)
    mine, others = shared_products(weights)
    compile_products([w for w in mine + others if weight_type(w).NAME in product_types],
                     buffers.inputs, exact)  # fmt: skip
    print("products", flush=True)
    compile_sampler(config)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
