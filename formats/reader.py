"""Read .slm files: the preamble and the manifest; tensors as views of a layer store; ``ModelReader`` for a local file.

The functions here work on bytes from anywhere (a local file, an HTTP body); a chunk's checks and decompression
are in ``chunk_codec.py`` (re-exported here). ``ModelReader`` adds a memory-mapped local file on top of them.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import (
    BadMagicError,
    FormatError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    UnsupportedVersionError,
    located,
)
from .chunk_codec import check_frame, check_frames, decompress_batch, decompress_chunk, decompress_chunks, frame_size_bytes, verify_chunk
from .constants import (
    DATA_ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    MAX_MANIFEST_SIZE_BYTES,
    PREAMBLE,
    PREAMBLE_SIZE_BYTES,
    READABLE_FORMAT_VERSIONS,
    align_up,
)
from .manifest import ChunkEntry, Manifest, TensorEntry, parse_manifest
from .quantize import fold_refinement

__all__ = [
    "ModelReader",
    "Preamble",
    "check_frame",
    "check_frames",
    "decompress_batch",
    "decompress_chunk",
    "decompress_chunks",
    "dequantize",
    "encode_preamble",
    "frame_size_bytes",
    "header_size_needed",
    "read_header",
    "read_preamble",
    "verify_chunk",
    "view_tensor",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Preamble:
    """The fixed 32 bytes at the start of every .slm file."""

    format_version: int
    manifest_size_bytes: int
    data_offset: int


def read_preamble(data: bytes | memoryview) -> Preamble:
    """Parse and validate the first PREAMBLE_SIZE_BYTES of a file.

    Raises:
        BadMagicError, UnsupportedVersionError, ManifestTooLargeError, ManifestSchemaError.
    """
    if len(data) < PREAMBLE_SIZE_BYTES:
        raise BadMagicError(f"file is {len(data)} bytes, shorter than the {PREAMBLE_SIZE_BYTES}-byte .slm preamble")
    magic, version, flags, manifest_size, data_offset = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagicError(f"not a streamload .slm file (magic {bytes(magic)!r}); convert the model to .slm first")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise UnsupportedVersionError(f"file has format version {version}; this streamload reads versions {readable}: upgrade streamload")
    if flags != 0:
        raise UnsupportedVersionError(f"file sets preamble flags {flags:#x}, unknown to this reader; upgrade streamload")
    if manifest_size > MAX_MANIFEST_SIZE_BYTES:
        raise ManifestTooLargeError(f"manifest is {manifest_size} bytes, over the {MAX_MANIFEST_SIZE_BYTES}-byte limit")
    expected_offset = align_up(PREAMBLE_SIZE_BYTES + manifest_size, DATA_ALIGNMENT)
    if data_offset != expected_offset:
        raise ManifestSchemaError(f"preamble data_offset {data_offset} should be {expected_offset}; the file is damaged")
    return Preamble(format_version=version, manifest_size_bytes=manifest_size, data_offset=data_offset)


def read_header(data: bytes | memoryview, file_size_bytes: int | None) -> tuple[Preamble, Manifest]:
    """Parse the preamble and manifest from the start of a file of ``file_size_bytes``.

    ``data`` must hold at least the first ``32 + manifest_size_bytes`` bytes; use
    ``header_size_needed`` on the first 32 bytes to learn how many. ``file_size_bytes``
    None skips the check that chunks lie inside the file (a header we validated before).

    Raises:
        FormatError: any malformation, including chunks that point past the end of the file.
    """
    preamble = read_preamble(data[:PREAMBLE_SIZE_BYTES])
    manifest_end = PREAMBLE_SIZE_BYTES + preamble.manifest_size_bytes
    if file_size_bytes is not None and preamble.data_offset > file_size_bytes:
        raise OutOfBoundsError(f"the manifest runs past the end of the file ({file_size_bytes} bytes); the file is truncated")
    if len(data) < manifest_end:
        raise OutOfBoundsError(f"need {manifest_end} header bytes, got {len(data)}")
    data_size = None if file_size_bytes is None else file_size_bytes - preamble.data_offset
    manifest = parse_manifest(memoryview(data)[PREAMBLE_SIZE_BYTES:manifest_end], data_size_bytes=data_size)  # copied once, there
    return preamble, manifest


def header_size_needed(data: bytes | memoryview) -> int:
    """How many bytes from the start of the file hold preamble + manifest (from the first 32)."""
    return PREAMBLE_SIZE_BYTES + read_preamble(data).manifest_size_bytes


def encode_preamble(manifest_size_bytes: int, format_version: int | None = None) -> bytes:
    """The preamble for a manifest of this size (used by the writer and golden tests); FORMAT_VERSION by default."""
    data_offset = align_up(PREAMBLE_SIZE_BYTES + manifest_size_bytes, DATA_ALIGNMENT)
    return PREAMBLE.pack(MAGIC, FORMAT_VERSION if format_version is None else format_version, 0, manifest_size_bytes, data_offset)


def view_tensor(store: memoryview | np.ndarray | mmap.mmap, entry: TensorEntry, base_offset: int = 0) -> np.ndarray:
    """A zero-copy numpy view of one tensor inside a buffer holding the layer store from ``base_offset``."""
    start = entry.raw_offset - base_offset
    return np.frombuffer(store, dtype=entry.dtype.numpy_name, count=int(np.prod(entry.shape, dtype=np.int64)), offset=start).reshape(
        entry.shape
    )


def dequantize(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of an INT8_ROW tensor (a copy; the runtime avoids this for whole models)."""
    return weight.astype(np.float32) * scales[:, None]


class ModelReader:
    """A local .slm file, memory-mapped read-only.

    Example:
        >>> with ModelReader("model.slm") as reader:          # doctest: +SKIP
        ...     print(reader.manifest.architecture, len(reader.manifest.layers))
        ...     reader.verify()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREAMBLE_SIZE_BYTES:
                raise BadMagicError(f"{self.path} is {size} bytes, too short to be a .slm file")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._mmap)
        try:
            self.preamble, self.manifest = read_header(self._view, size)
        except FormatError as exc:
            self.close()
            raise located(exc, str(self.path)) from None
        except BaseException:
            self.close()
            raise
        self.size_bytes = size

    def close(self) -> None:
        self._view.release()
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the map closes when it is collected
            pass

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunk_bytes(self, chunk: ChunkEntry) -> memoryview:
        """The compressed bytes of a chunk, zero-copy."""
        start = self.preamble.data_offset + chunk.offset
        return self._view[start : start + chunk.size_bytes]

    def read_chunk(self, chunk: ChunkEntry, out: memoryview | bytearray | None = None) -> memoryview | bytearray:
        """Verify then decompress one chunk."""
        data = self.chunk_bytes(chunk)
        verify_chunk(chunk, data)
        return decompress_chunk(chunk, data, out)

    def read_layer(self, layer_index: int, *, coarse: bool = False) -> bytearray:
        """The decompressed bytes of one layer (a copy in memory): exact, or (``coarse``) progressive tensors at their
        coarse levels, without their refinements."""
        layer = self.manifest.layers[layer_index]
        buffer = bytearray(layer.raw_size_bytes)
        view = memoryview(buffer)
        for chunk in self.manifest.chunks_of_layer(layer_index):
            start = chunk.raw_offset - layer.raw_offset
            self.read_chunk(chunk, view[start : start + chunk.raw_size_bytes])
        if not coarse:
            for chunk in self.manifest.refinements_of_layer(layer_index):
                start = chunk.raw_offset - layer.raw_offset
                stored = np.frombuffer(buffer, np.int8, chunk.raw_size_bytes, start)
                refinement = np.frombuffer(self.read_chunk(chunk), np.int8)
                stored[:] = fold_refinement(stored, refinement, self._shift_at(chunk.raw_offset))
        return buffer

    def _shift_at(self, raw_offset: int) -> int:
        """The coarse_shift of the progressive tensor holding this store offset (the manifest checked there is one)."""
        for tensor in self.manifest.tensors:
            if tensor.coarse_shift is not None and tensor.raw_offset <= raw_offset < tensor.raw_end:
                return tensor.coarse_shift
        raise AssertionError(f"no progressive tensor at store offset {raw_offset}")  # pragma: no cover - parse_manifest checked

    def read_tensors(self, layer_index: int, *, coarse: bool = False) -> dict[str, np.ndarray]:
        """Every tensor of a layer as numpy arrays over one decompressed buffer (``coarse``: see ``read_layer``)."""
        layer = self.manifest.layers[layer_index]
        buffer = self.read_layer(layer_index, coarse=coarse)
        return {t.name: view_tensor(buffer, t, layer.raw_offset) for t in self.manifest.tensors_of_layer(layer_index)}

    def verify(self) -> list[FormatError]:
        """Check every chunk's hash and decoded size; returns the problems found (empty when intact)."""
        problems: list[FormatError] = []
        for chunk in self.manifest.chunks + self.manifest.refinement_chunks:
            try:
                self.read_chunk(chunk)
            except FormatError as exc:
                problems.append(exc)
        return problems
