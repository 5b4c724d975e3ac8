"""safetensors files: an 8-byte header length, a JSON header, then the tensors' bytes.

Read directly (the format is that small): each tensor is a view into the memory-mapped file,
its extent checked against the file's size. bf16 comes back as raw uint16 with a flag.
"""

from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from llamette.errors import LlametteError
from llamette.formats.pytorch import BF16, TorchTensor

DTYPES = {
    "F32": (np.dtype("<f4"), "FloatStorage"),
    "F16": (np.dtype("<f2"), "HalfStorage"),
    "BF16": (np.dtype("<u2"), BF16),
    "F64": (np.dtype("<f8"), "DoubleStorage"),
    "I64": (np.dtype("<i8"), "LongStorage"),
    "I32": (np.dtype("<i4"), "IntStorage"),
    "I8": (np.dtype("i1"), "CharStorage"),
    "U8": (np.dtype("u1"), "ByteStorage"),
    "BOOL": (np.dtype("?"), "BoolStorage"),
}


def read_safetensors(path: str | os.PathLike) -> dict[str, TorchTensor]:
    """The tensors of a safetensors file by name, memory-mapped."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LlametteError(f"{path}: {size} bytes, too short for a safetensors file")
            (header_length,) = struct.unpack("<Q", head)
            if header_length > min(size - 8, 100 << 20):
                raise LlametteError(
                    f"{path}: truncated or not safetensors (header of {header_length} bytes "
                    f"in a {size}-byte file)"
                )
            header = json.loads(f.read(header_length))
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as error:
        raise LlametteError(f"{path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LlametteError(f"{path}: not a safetensors file (its header is not JSON)") from None
    start = 8 + header_length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, storage_type = DTYPES[info["dtype"]]
            shape = tuple(int(n) for n in info["shape"])
            begin, end = (int(n) for n in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise LlametteError(f"{path}: tensor {name}: malformed or unsupported entry") from None
        numel = int(np.prod(shape))
        if end - begin != numel * dtype.itemsize or start + end > size:
            raise LlametteError(
                f"{path}: truncated: tensor {name} needs bytes up to {start + end}, "
                f"the file has {size}"
            )
        data = np.frombuffer(buffer, dtype, numel, start + begin).reshape(shape)
        tensors[name] = TorchTensor(data, storage_type)
    return tensors
