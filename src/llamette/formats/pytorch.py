"""PyTorch checkpoints (`torch.save` zip files: Meta's consolidated.*.pth, pytorch_model*.bin).

Read without torch and without running pickled code: the pickle may name only the few globals a
state dict of tensors needs, and each tensor becomes a view into the memory-mapped zip member
that holds its storage (torch stores members uncompressed).
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import zipfile

import numpy as np

from llamette.errors import LlametteError

# torch's storage classes and the NumPy dtype of their bytes (bf16 kept as raw uint16)
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "DoubleStorage": np.dtype("<f8"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ByteStorage": np.dtype("u1"),
    "CharStorage": np.dtype("i1"),
    "BoolStorage": np.dtype("?"),
}
BF16 = "BFloat16Storage"


class StorageType(str):
    """The name of a torch storage class, as the pickle names it."""


class TorchTensor:
    """A tensor of a torch checkpoint: its storage's dtype and a view into the mapped file."""

    def __init__(self, data: np.ndarray, storage_type: str):
        self.data = data
        self.storage_type = storage_type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def weight_type(self) -> str:
        """The GGUF weight type that holds its values as they are: bf16, f16, else f32."""
        return {BF16: "bf16", "HalfStorage": "f16"}.get(self.storage_type, "f32")

    def to_float32(self) -> np.ndarray:
        """The values as float32: a view when stored as float32, else a converted copy."""
        if self.storage_type == BF16:
            return (self.data.astype(np.uint32) << 16).view(np.float32)
        if self.data.dtype == np.float32:
            return self.data
        return self.data.astype(np.float32)


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view into a storage."""
    storage_type, data = storage
    itemsize = data.dtype.itemsize
    if len(size) and (
        offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) >= data.size
    ):
        raise pickle.UnpicklingError("a tensor reaches beyond its storage")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return TorchTensor(view, storage_type)


def _rebuild_parameter(tensor, *_):
    """torch._utils._rebuild_parameter: a Parameter is its tensor."""
    return tensor


def _ordered_dict(*args):
    from collections import OrderedDict

    return OrderedDict(*args)


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"its pickle asks for {module}.{name}, which a state dict of tensors never needs"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r:.60}")
        return storage_type, self.storages(str(key), STORAGE_DTYPES[storage_type], int(numel))


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, TorchTensor]:
    """The tensors of a torch.save zip file by name, memory-mapped."""
    path = os.fspath(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a torch zip checkpoint"
        raise LlametteError(f"{path}: {reason or error}") from None
    with archive, open(path, "rb") as f:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise LlametteError(f"{path}: not a torch checkpoint (no data.pkl in the archive)")
        prefix = pickles[0][: -len("data.pkl")]
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

        def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
            try:
                info = archive.getinfo(f"{prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
            if info.compress_type != zipfile.ZIP_STORED or info.file_size < numel * dtype.itemsize:
                raise pickle.UnpicklingError(f"storage {key} is compressed or short")
            # the local file header: 30 bytes, then the name and an extra field of its own length
            name_length, extra_length = struct.unpack_from("<HH", buffer, info.header_offset + 26)
            start = info.header_offset + 30 + name_length + extra_length
            if start + numel * dtype.itemsize > len(buffer):
                raise pickle.UnpicklingError(f"storage {key} is truncated")
            return np.frombuffer(buffer, dtype, numel, start)

        try:
            with archive.open(pickles[0]) as pickled:
                state = _StateDictUnpickler(pickled, storage).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, struct.error) as error:
            raise LlametteError(f"{path}: refused: {error}") from None
    if not isinstance(state, dict) or not all(
        isinstance(value, TorchTensor) for value in state.values()
    ):
        raise LlametteError(f"{path}: not a state dict of tensors")
    return dict(state)
