"""Read tensors from .safetensors files: whole, as zero-copy memory maps, or a block of rows at a time.

We parse the documented safetensors layout (u64 header length, JSON header,
byte buffer) ourselves because the ``safetensors`` numpy backend cannot hand out
bfloat16 tensors, and because reading rows ourselves lets conversion run in
bounded memory: ``read_rows`` reads a row range with one ``pread`` into a fresh
array and then drops those pages from the page cache (``posix_fadvise``
DONTNEED), so neither the process's resident set nor a memory cgroup's page
cache grows with the model. ``array`` maps the whole tensor instead (its pages
count as resident once touched); tests and tools use it, the converter does not.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import ConversionInputError

MAX_HEADER_SIZE_BYTES = 100 << 20  # the safetensors reference implementation's cap

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 on read
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "F64"})


class SafetensorsFile:
    """One .safetensors file, memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
                if not 2 <= header_size <= min(MAX_HEADER_SIZE_BYTES, size - 8):
                    raise ConversionInputError(f"{self.path}: not a safetensors file (header length {header_size})")
                header = json.loads(f.read(header_size))
        except (OSError, ValueError) as exc:
            raise ConversionInputError(f"cannot read safetensors file {self.path}: {exc}") from None
        if not isinstance(header, dict):
            raise ConversionInputError(f"{self.path}: safetensors header is not a JSON object")
        self.metadata: Mapping[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_size
        self._data_size = size - self._data_start
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ConversionInputError(f"{self.path}: malformed header entry for {name!r}") from None
            if dtype not in _DTYPES:
                raise ConversionInputError(f"{self.path}: tensor {name!r} has dtype {dtype}, which streamload cannot read")
            if not 0 <= start <= end <= self._data_size or end - start != math.prod(shape) * _DTYPES[dtype].itemsize:
                raise ConversionInputError(f"{self.path}: tensor {name!r} has inconsistent offsets; the file is damaged")
            self._entries[name] = (dtype, shape, start, end)
        self._map: np.ndarray | None = None  # mapped on the first ``array`` call

    def names(self) -> Iterable[str]:
        return self._entries.keys()

    def dtype_of(self, name: str) -> str:
        return self._entries[name][0]

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def size_bytes_of(self, name: str) -> int:
        _, _, start, end = self._entries[name]
        return end - start

    def array(self, name: str) -> np.ndarray:
        """The tensor's values: a zero-copy view, except bf16, which is widened to float32."""
        dtype, shape, start, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._data_start + self._data_size else np.zeros(0, np.uint8)
        raw = self._map[self._data_start + start : self._data_start + end].view(_DTYPES[dtype]).reshape(shape)
        return _widened(raw, dtype)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the tensor (along its first dimension; a 0-D tensor is one row), read into memory.

        The pages read are dropped from the page cache afterwards. bf16 is widened to float32.

        Raises:
            ConversionInputError: the file is unreadable or shorter than its header says.
        """
        dtype, shape, begin, _ = self._entries[name]
        row_shape = shape[1:]
        row_bytes = math.prod(row_shape) * _DTYPES[dtype].itemsize
        offset = self._data_start + begin + start * row_bytes
        buffer = np.empty((stop - start) * row_bytes, dtype=np.uint8)
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(offset)
                done = 0
                while done < buffer.size and (got := f.readinto(memoryview(buffer)[done:])):
                    done += got
                if done < buffer.size:
                    raise ConversionInputError(f"{self.path} ends inside tensor {name!r}; the file is damaged")
                page = mmap.PAGESIZE
                floor = offset - offset % page  # the page this read shares with the previous one is done with too
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), floor, offset + buffer.size - floor, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ConversionInputError(f"cannot read {self.path}: {exc}") from None
        raw = buffer.view(_DTYPES[dtype]).reshape((stop - start, *row_shape) if shape else ())
        return _widened(raw, dtype)


def _widened(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 is the top half of an f32
    return raw


class SafetensorsCollection:
    """Several shards seen as one name -> tensor mapping."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.files = [SafetensorsFile(p) for p in paths]
        self._owner: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.names():
                if name in self._owner:
                    raise ConversionInputError(f"tensor {name!r} appears in both {self._owner[name].path.name} and {f.path.name}")
                self._owner[name] = f

    def names(self) -> list[str]:
        return list(self._owner)

    def dtype_of(self, name: str) -> str:
        return self._owner[name].dtype_of(name)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._owner[name].shape_of(name)

    def array(self, name: str) -> np.ndarray:
        return self._owner[name].array(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._owner[name].read_rows(name, start, stop)

    def size_bytes_of(self, name: str) -> int:
        return self._owner[name].size_bytes_of(name)

    @property
    def size_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)
