"""Weight types: one module per type, one row of the table `TYPES` each.

A type's module holds everything about it: its layout (a NamedTuple of the file's arrays, or a
plain float32 matrix), `dequantize` in NumPy (the reference its tests compare with), its GGUF
type number and block size, and the compiled functions the forward pass calls: `decode_row` (an
embedding lookup) and `product` (x @ w^T for a batch of inputs, in the flavour asked for), plus
those of the kernel family it belongs to (kernels.int8, kernels.decoded). Compiled code reaches a
type's functions through kernels.dispatch, which finds them here.

Adding a type is writing its module and adding it to TYPES. A type's `product` is compiled for
compiled code only (without the wrapper a call from Python goes through, a fifth of a second of
its compile): Python calls it through `call_product`.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

import numpy as np
from numba import types
from numba.core.errors import TypingError

from llamette.kernels import kernel
from llamette.kernels.dispatch import product
from llamette.weight_types import (
    bf16,
    f16,
    f32,
    iq4_nl,
    iq4_xs,
    q2_k,
    q3_k,
    q4_0,
    q4_1,
    q4_k,
    q5_0,
    q5_1,
    q5_k,
    q6_k,
    q8,
    q8_0,
)

TYPES: tuple[ModuleType, ...] = (f32, q8, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k,
                                 q5_k, q6_k, iq4_nl, iq4_xs)  # fmt: skip

Tensor = np.ndarray | q8.Q8Tensor | f16.F16Tensor | bf16.BF16Tensor | q8_0.Q8_0Tensor | \
    q4_0.Q4_0Tensor | q4_1.Q4_1Tensor | q5_0.Q5_0Tensor | q5_1.Q5_1Tensor | q2_k.Q2_KTensor | \
    q3_k.Q3_KTensor | q4_k.Q4_KTensor | q5_k.Q5_KTensor | q6_k.Q6_KTensor | iq4_nl.IQ4_NLTensor | \
    iq4_xs.IQ4_XSTensor  # fmt: skip
Q8Tensor, Q8_0Tensor = q8.Q8Tensor, q8_0.Q8_0Tensor
quantize_q8 = q8.quantize_q8

# GGUF types llamette runs, by GGUF type number
BY_GGUF_TYPE = {t.GGUF_TYPE: t for t in TYPES if t.GGUF_TYPE is not None}
BY_NAME = {t.NAME: t for t in TYPES}


def weight_type(tensor: Tensor) -> ModuleType:
    """The module of a tensor's type."""
    for kind in TYPES:
        if isinstance(tensor, kind.Tensor):
            return kind
    raise TypeError(f"{type(tensor).__name__} is not a weight type of llamette's")


@kernel
def call_product(out, x, w, inputs, exact):
    """out (B, d) = x (B, n) @ w (d, n)^T by w's weight type's own product, from Python (tests):
    exact as compiled code passes it (kernels.flavour), inputs an Int8Inputs."""
    product(out, x, w, inputs, exact)


def type_of(numba_type: types.Type) -> ModuleType:
    """The module of the weight type a compiled-code type stands for."""
    if isinstance(numba_type, types.Array) and numba_type.dtype == types.float32:
        return f32
    if isinstance(numba_type, types.BaseNamedTuple):
        for kind in TYPES:
            if numba_type.instance_class is kind.Tensor:
                return kind
    raise TypingError(f"{numba_type} is not a weight type of llamette's")


def nbytes(tensor: Tensor) -> int:
    """Bytes a tensor of any type occupies (what a product with it reads)."""
    if isinstance(tensor, np.ndarray):
        return tensor.nbytes
    return sum(part.nbytes for part in tensor if isinstance(part, np.ndarray))


def to_float32(tensor: Tensor) -> np.ndarray:
    """Any tensor's values as a float32 array (a float32 array itself is returned as it is)."""
    return tensor if isinstance(tensor, np.ndarray) else tensor.dequantize()


def is_int8_family(tensor: Tensor) -> bool:
    """Whether products with the tensor quantize their input to int8 (kernels.int8)."""
    return hasattr(weight_type(tensor), "input_group_size")


def smallest_input_group(tensors: Iterable[Tensor]) -> int:
    """The smallest group that an int8-family weight quantizes its input in (it sizes the
    memory for the input's scales); 32 where there is no such weight."""
    sizes = [weight_type(t).input_group_size(t) for t in tensors if is_int8_family(t)]
    return min(sizes, default=32)


def quantize(w: np.ndarray, name: str) -> np.ndarray:
    """w (rows, cols) float32 in the GGUF type `name` as a GGUF file stores it: by the type's
    module where it has a quantizer of its own (the K-quants), else by gguf-py's."""
    import gguf

    kind = BY_NAME.get(name)
    if hasattr(kind, "quantize"):
        return kind.quantize(w)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[name.upper()])


def gguf_names(written: bool = False) -> tuple[str, ...]:
    """The GGUF types llamette runs, by name; with `written`, only those it also writes (a type's
    module sets WRITTEN = False where neither it nor gguf-py has a quantizer)."""
    return tuple(
        kind.NAME for kind in BY_GGUF_TYPE.values() if not written or getattr(kind, "WRITTEN", True)
    )
