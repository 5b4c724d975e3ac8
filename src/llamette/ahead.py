"""Compiling on two cores: while a process compiles a model's forward pass (a first run, with an
empty kernel cache), a helper process compiles some of its kernels into the cache, where the
first process then finds them.

Numba compiles one function at a time under a process-wide lock. A cold start (a model whose
typed lists of layers are not cached: its first compile) shares the work out, and the first
process waits for its helper's line before it takes the pass from the cache (or compiles what is
not there, if the helper stopped short):
- a model of several weight types (Q4_K_M: Q4_K and Q6_K): the first process compiles the own
  kernels of half the types, every other one the pass reaches (the first, the third...), then
  the products of all types but the helper's outside the int8 family (products_compiled_by),
  and the pass's steps, then tells the helper (on its stdin) that its share is done; the helper
  attention, then the other types' own kernels (calling the lane kernels that every int8-family
  type shares, which the first process compiles, by their symbols alone) and the products of
  those outside the int8 family, then, if attention was cached and the first process has not
  said that it is done, the pass as below, then prints its line. The input quantization that
  the int8 family's products share is the helper's to compile first where the first process has
  int8-family types, else the first process's (quantizing_process);
- one weight type: the first process compiles the products, the type's own kernels first (the
  inputs in lanes, the rows: kernels.int8.compile_kernels); the helper attention, and if it was
  in the cache already (a model of a new weight type, after others), the input quantization
  (which the product then loads), the pass's other steps and the pass itself, calling the first
  process's products by their symbols alone (kernels.dispatch.products_compiled_elsewhere), then
  prints its line; if not, it prints its line at once (the first process compiles the pass) and
  compiles the other steps.
The helper then compiles the sampler and, where the model has no int8-family weights, the input
quantization that those types share, for a next model, if the first process has not ended by
then (it stops the helper). A helper started by a later compile (the pass for another KV-cache
type) takes the kernels the pass reaches last, the longest first (attention, the gate), which the
pass, if it gets there first, compiles itself.

Usage (the helper): python -m llamette.ahead MODEL_FILE KV_TYPE fast|exact products|pass|last
"""

from __future__ import annotations

import atexit
import contextlib
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from numba.core import event

from llamette.errors import LlametteError

SWITCH = "LLAMETTE_COMPILE_AHEAD"  # "0": no helper
T = TypeVar("T")
# Attention loaded within this many seconds was in the cache, as the pass's other steps then are:
# the helper has the time to compile the pass while the first process compiles the products.
LOADED_SECONDS = 1.0


class CompileAhead(event.Listener):
    """One model's helper: started, at most once, by the first compile while `watching`."""

    def __init__(self, model_file: str, kv_type: str, exact: bool, helper_products: bool = False):
        # a llama2.c or GGUF file, whose types the helper loads again; not a model from
        # elsewhere, and not from the helper itself (LLAMETTE_COMPILE_AHEAD=0)
        wanted = os.path.isfile(model_file) and os.environ.get(SWITCH) != "0"
        self.command = [sys.executable, "-m", "llamette.ahead", model_file, kv_type,
                        "exact" if exact else "fast"] if wanted else None  # fmt: skip
        self.helper_products = helper_products  # whether a cold start shares products out
        self.helper: subprocess.Popen | None = None
        self._sharing = False  # whether the helper, once started, shares out a cold start

    @contextlib.contextmanager
    def watching(self, cold_start: bool = False):
        """While the block runs, a compile starts the helper (if it has not started yet): one
        that shares out the work if cold_start (the block builds the model's typed lists, the
        first compile of a cold start: see forward_compiled), else one that takes the last
        kernels."""
        if self.command is None or self.helper is not None:
            yield
            return
        self._sharing = cold_start
        event.register("numba:compile", self)
        try:
            yield
        finally:
            event.unregister("numba:compile", self)

    def on_start(self, _: event.Event) -> None:
        if self.helper is None:
            role = "last" if not self._sharing else "products" if self.helper_products else "pass"
            talks = subprocess.PIPE if self._sharing else subprocess.DEVNULL
            self.helper = subprocess.Popen(
                [*self.command, role], stdin=talks, stdout=talks, stderr=subprocess.DEVNULL,
                env={**os.environ, SWITCH: "0"},
            )  # fmt: skip
            atexit.register(_stop, self.helper)  # its work is only worth this process's run

    def on_end(self, _: event.Event) -> None:
        pass

    def forward_compiled(self, compile_own_share: Callable[[], None],
                         compile_forward: Callable[[], T]) -> T:  # fmt: skip
        """compile_forward's result; where the helper shares out a cold start, compile_own_share
        first, then wait for the helper's line (its share cached), after which compile_forward
        loads what the helper compiled."""
        if self._sharing and self.helper is not None:
            self._sharing = False
            compile_own_share()
            with contextlib.suppress(OSError):  # (a helper that has ended)
                self.helper.stdin.write(b"done\n")
                self.helper.stdin.close()
            self.helper.stdout.readline()  # its line, or its end
        with self.watching():
            return compile_forward()


def shared_products(weights) -> tuple[list, list]:
    """The weights the forward pass multiplies by, the first of each type in the order the pass
    reaches them, split between a cold start's two processes: alternately, the first process
    first (the helper compiles the other steps and the pass besides); none for the helper if
    there is one type."""
    from llamette.model import layers_of
    from llamette.weight_types import weight_type

    first_of_type = {}
    for layer in layers_of(weights):
        for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w3, layer.w2):
            first_of_type.setdefault(weight_type(w).NAME, w)
    first_of_type.setdefault(weight_type(weights.classifier).NAME, weights.classifier)
    firsts = list(first_of_type.values())
    return firsts[0::2], firsts[1::2]


def quantizing_process(first_process_products: list, helper_products: list) -> str | None:
    """Which process of a cold start compiles the input quantization that the int8 family's
    products share, before its own kernels: the helper where the first process has int8-family
    products (it compiles the lane kernels those share, kernels.int8.SHARED_LANE_KERNELS, with
    the first of them), else the first process; None where no product is of the int8 family."""
    from llamette.weight_types import is_int8_family

    if not any(map(is_int8_family, first_process_products + helper_products)):
        return None
    return "helper" if any(map(is_int8_family, first_process_products)) else "first"


def products_compiled_by(first_process_products: list, helper_products: list) -> tuple[list, list]:
    """The products that each process of a cold start compiles, (the first's, the helper's): the
    first process its own weight types', then the helper's int8-family types', whose kernels the
    helper compiles meanwhile (a product over compiled kernels is a short compile, which evens out
    the two shares); the helper those of its other types (their products are their kernels)."""
    from llamette.weight_types import is_int8_family

    helpers_int8 = [w for w in helper_products if is_int8_family(w)]
    helpers_other = [w for w in helper_products if not is_int8_family(w)]
    return first_process_products + helpers_int8, helpers_other


def compile_products(weights, inputs, exact: bool) -> None:
    """Compile (or load) the products with these weights, for the argument types the forward
    pass gives them."""
    import numpy as np

    from llamette.kernels import entry_point, flavour
    from llamette.weight_types import weight_type

    for w in weights:
        rows, cols = w.shape
        args = (np.zeros((1, rows), np.float32), np.zeros((1, cols), np.float32), w, inputs,
                flavour(exact))  # fmt: skip
        entry_point(weight_type(w).product, args)


def shared_lane_kernels_elsewhere(first_process_products: list):
    """A block in which the helper's lane kernels call those that every int8-family type shares
    (kernels.int8.SHARED_LANE_KERNELS) by symbol alone, uncompiled, where the first process
    compiles them with its own int8-family products (the two compiled them side by side)."""
    from llamette.kernels.int8 import SHARED_LANE_KERNELS
    from llamette.kernels.symbols import compiled_elsewhere
    from llamette.weight_types import is_int8_family

    first_compiles = any(map(is_int8_family, first_process_products))
    return compiled_elsewhere(SHARED_LANE_KERNELS if first_compiles else ())


def compile_type_kernels(weights) -> None:
    """The kernels that the products with these weights (of the int8 family) reach after the
    input's quantization, which a process compiles before the products: the inputs in lanes, the
    rows in lanes, a row at a time (kernels.int8.compile_kernels); none for weights whose type
    says that their products take other kernels (`runs_int8_kernels`: llama2.c's Q8 in groups
    that do not tile the rows)."""
    from llamette.kernels.int8 import compile_kernels
    from llamette.weight_types import is_int8_family, weight_type

    for w in filter(is_int8_family, weights):
        kind = weight_type(w)
        if getattr(kind, "runs_int8_kernels", lambda _: True)(w):
            compile_kernels(w, in_lanes=hasattr(kind, "sixteen_rows"))


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

    from llamette.kernels import flavour
    from llamette.kernels.layers import attention

    b, first = buffers, np.zeros(1, np.int64)  # the rows' positions and slots: rows[1], rows[2]
    attention(b.attended[:1], b.q[:1], kv_cache, 0, first, first, config.n_heads, b.scores,
              flavour(exact))  # fmt: skip


def compile_steps(buffers, kv_cache, exact: bool) -> None:
    """The feed-forward's gate, the residual's addition, rotary embedding, the KV cache's store."""
    import numpy as np

    from llamette.kernels import flavour
    from llamette.kernels.layers import add, rope, store_kv, swiglu

    b, first = buffers, np.zeros(1, np.int64)
    swiglu(b.gate[:1], b.up[:1], flavour(exact))
    add(b.x[:1], b.out[:1])
    rope(b.q[:1], b.k[:1], b.cos[:1], b.sin[:1])
    store_kv(kv_cache, 0, first, first, b.k[:1], b.v[:1])


def compile_input_quantization() -> None:
    """The quantization of a product's input that every int8-family weight type shares
    (kernels.int8.quantized), for the argument types the forward pass gives it: a helper whose
    model has none of those types has the time to spare, and a first run of such a type then
    loads it."""
    import numpy as np

    from llamette.kernels import entry_point
    from llamette.kernels.int8 import Int8Inputs, quantized

    args = np.zeros((1, 256), np.float32), Int8Inputs.sized(1, 256), np.int64(32)
    entry_point(quantized, args)  # (compiled code's only: no call from Python)


def compile_sampler(config) -> None:
    import numpy as np

    from llamette.sampler import Sampler

    Sampler(config.vocab_size, temperature=1.0, topp=0.9, seed=1).sample(
        np.zeros(config.vocab_size, np.float32)
    )


def compile_pass(weights, exact: bool, kv_type: str, first_process_products: list) -> None:
    """The forward pass, for the cache: the products that the first process compiles called by
    their symbols alone (see main)."""
    from llamette.kernels.dispatch import products_compiled_elsewhere
    from llamette.model import Transformer
    from llamette.weight_types import weight_type

    model = Transformer(weights, exact=exact, kv_type=kv_type)  # its lists, as cached
    with products_compiled_elsewhere(weight_type(w).NAME for w in first_process_products):
        model.compile_pass()


def _first_process_done() -> bool:
    """Whether the first process has said that its share is compiled (or has ended)."""
    return bool(select.select([sys.stdin], [], [], 0)[0])


def main(argv: list[str]) -> int:
    """The helper (see the module's docstring): the model file's buffers and KV cache as a
    Transformer makes them, then its role's kernels."""
    from llamette.formats import load_weights
    from llamette.model import Buffers, new_kv_cache
    from llamette.weight_types import smallest_input_group

    model_file, kv_type, kind, role = argv
    weights, exact = load_weights(model_file), kind == "exact"
    config = weights.config
    buffers = Buffers.for_config(config, 1, smallest_input_group(weights.tensors.values()), False)
    kv_cache = new_kv_cache(config, 1, kv_type, exact)
    first_process_products, helper_products = shared_products(weights)
    quantizer = quantizing_process(first_process_products, helper_products)
    if role == "last":
        compile_last_kernels(config, buffers, kv_cache, exact)
    elif role == "products":
        start = time.perf_counter()
        compile_attention(config, buffers, kv_cache, exact)
        steps_cached = time.perf_counter() - start < LOADED_SECONDS  # as attention was
        if quantizer == "helper":
            compile_input_quantization()
        with shared_lane_kernels_elsewhere(first_process_products):
            compile_type_kernels(helper_products)
        firsts, helpers = products_compiled_by(first_process_products, helper_products)
        compile_products(helpers, buffers.inputs, exact)
        if steps_cached and not _first_process_done():  # its products still compiling
            compile_pass(weights, exact, kv_type, firsts)
            print("pass", flush=True)
        else:
            print("products", flush=True)
        compile_sampler(config)
    else:  # "pass"
        start = time.perf_counter()
        compile_attention(config, buffers, kv_cache, exact)
        if time.perf_counter() - start < LOADED_SECONDS:  # cached, as the other steps will be
            if quantizer == "helper":  # (one type: the helper's)
                compile_input_quantization()  # meanwhile the first process its type's kernels
            compile_steps(buffers, kv_cache, exact)
            compile_pass(weights, exact, kv_type, first_process_products)
            print("pass", flush=True)
        else:  # a cold start of everything: the first process compiles the pass
            print("no pass", flush=True)
            compile_steps(buffers, kv_cache, exact)
        compile_sampler(config)
    if quantizer is None:
        compile_input_quantization()  # for a next model, of another type
    return 0


ROLES = ("products", "pass", "last")
USAGE = f"usage: python -m llamette.ahead MODEL_FILE KV_TYPE fast|exact {'|'.join(ROLES)}"


def run(argv: list[str]) -> int:
    """main, with bad arguments or a bad model file told in one line (exit 2)."""
    if len(argv) != 4 or argv[2] not in ("fast", "exact") or argv[3] not in ROLES:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return main(argv)
    except LlametteError as error:
        print(f"llamette.ahead: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
