"""A delta file's bytes: its index parsed and checked, a chunk rebuilt from its entry, a whole file encoded, summarised.

The layout itself is declared in ``constants`` (``DELTA_PREAMBLE``, ``DELTA_ENTRY``, ``delta_data_offset``;
FORMAT.md, "Delta files"); this module reads and writes it. ``parse_delta_index`` validates the index while parsing it
into numpy columns (linear in the entries); ``rebuild_chunk`` checks what it rebuilds against its sha256 before
returning it. Threads: the caller's.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ChunkIntegrityError, FormatError
from .constants import (
    DELTA_ENTRY,
    DELTA_MAGIC,
    DELTA_PREAMBLE,
    DELTA_PREAMBLE_SIZE_BYTES,
    DELTA_SUFFIX,
    DELTA_VERSION,
    MAX_CHUNK_RAW_SIZE_BYTES,
    MAX_DELTA_ENTRIES,
    SHA256_SIZE_BYTES,
    DeltaMethod,
    delta_data_offset,
    delta_index_size,
)
from .manifest import ChunkEntry


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaIndex:
    """A delta file's preamble and entries (columns), validated."""

    base_digest: str
    chunk_index: np.ndarray  # int64
    method: np.ndarray
    base_raw_offset: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    sha256: np.ndarray  # (n, 32) uint8

    @property
    def data_offset(self) -> int:
        return delta_data_offset(len(self.chunk_index))

    def __len__(self) -> int:
        return len(self.chunk_index)


def delta_file_name(model_file_name: str, base_digest: str, target_digest: str) -> str:
    """The delta file's name beside the model file: ``minilm.slm`` -> ``minilm.<base 12>-<target 12>.slmd``."""
    stem = model_file_name[: -len(".slm")] if model_file_name.endswith(".slm") else model_file_name
    return f"{stem}.{base_digest[:12]}-{target_digest[:12]}{DELTA_SUFFIX}"


def _entry_dtype() -> np.dtype:
    """DELTA_ENTRY's fields as numpy columns, to parse every entry at once."""
    return np.dtype(
        [("chunk_index", "<u4"), ("method", "<u4"), ("base_raw_offset", "<u8"), ("offset", "<u8"), ("size", "<u8"), ("sha256", "V32")]
    )


def index_size_needed(preamble: bytes | memoryview) -> int:
    """From a delta file's first DELTA_PREAMBLE_SIZE_BYTES: how many bytes hold the preamble and the entries."""
    return delta_index_size(_read_preamble(preamble)[1])


def _read_preamble(data: bytes | memoryview) -> tuple[str, int]:
    if len(data) < DELTA_PREAMBLE_SIZE_BYTES:
        raise FormatError(f"a delta file starts with {DELTA_PREAMBLE_SIZE_BYTES} bytes of preamble, got {len(data)}")
    magic, version, flags, count, base = DELTA_PREAMBLE.unpack_from(data)
    if magic != DELTA_MAGIC:
        raise FormatError("not a streamload delta file (bad magic)")
    if version != DELTA_VERSION or flags:
        raise FormatError(f"delta file version {version}, flags {flags:#x}: this reader reads version {DELTA_VERSION}; upgrade streamload")
    if count > MAX_DELTA_ENTRIES:
        raise FormatError(f"delta file declares {count} entries, over the {MAX_DELTA_ENTRIES} a reader accepts")
    return bytes(base).hex(), int(count)


def parse_delta_index(data: bytes | memoryview, *, file_size_bytes: int | None = None) -> DeltaIndex:
    """Validate a delta file's preamble and entries (``data`` holds at least ``index_size_needed`` bytes).

    Raises:
        FormatError: bad magic or version; entries out of order, frames that overlap, run past the file or are
            larger than a chunk can be; an unknown method.
    """
    base, count = _read_preamble(data)
    end = delta_index_size(count)
    if len(data) < end:
        raise FormatError(f"the delta index needs {end} bytes, got {len(data)}")
    rows = np.frombuffer(data, _entry_dtype(), count, DELTA_PREAMBLE_SIZE_BYTES)
    chunk_index = rows["chunk_index"].astype(np.int64)
    method = rows["method"].astype(np.int64)
    offset, size = rows["offset"].astype(np.uint64), rows["size"].astype(np.uint64)
    if count:
        if (np.diff(chunk_index) <= 0).any():
            raise FormatError("delta entries must name ascending chunk indices")
        if not np.isin(method, [m.value for m in DeltaMethod]).all():
            raise FormatError("a delta entry has an unknown method; upgrade streamload")
        if (size == 0).any() or (size > np.uint64(2 * MAX_CHUNK_RAW_SIZE_BYTES)).any():
            raise FormatError("a delta entry's frame is empty or larger than a chunk can be")
        ends = offset + size
        if (offset[1:] < ends[:-1]).any():
            raise FormatError("delta frames must be in entry order and must not overlap")
        if file_size_bytes is not None and int(ends[-1]) > file_size_bytes - delta_data_offset(count):
            raise FormatError("a delta frame runs past the end of the delta file; it is truncated")
    sha = np.frombuffer(rows["sha256"].tobytes(), np.uint8).reshape(count, SHA256_SIZE_BYTES)
    return DeltaIndex(
        base_digest=base,
        chunk_index=chunk_index,
        method=method,
        base_raw_offset=rows["base_raw_offset"].astype(np.int64),
        offset=offset.astype(np.int64),
        size=size.astype(np.int64),
        sha256=sha,
    )


def rebuild_chunk(
    chunk: ChunkEntry, method: int, frame: bytes | memoryview, sha256: bytes, base: bytes | memoryview | None
) -> bytes | bytearray:
    """The raw bytes of ``chunk`` from its delta entry, checked: a whole frame against the chunk's sha256, a difference
    (applied to ``base``, the chunk's range of the base's store) against the entry's raw sha256.

    Raises:
        ChunkIntegrityError: a hash differs (a damaged delta file, or the wrong base).
        ChunkDecodeError: the frame is not exactly one zstd frame of the chunk's raw size.
    """
    from .chunk_codec import decompress_chunk, verify_chunk

    if method == DeltaMethod.WHOLE:
        verify_chunk(chunk, frame)
        return decompress_chunk(chunk, frame)
    if base is None or len(base) != chunk.raw_size_bytes:
        raise ChunkIntegrityError(
            f"chunk {chunk.index}: no base bytes to apply its delta to", layer_index=chunk.layer_index, chunk_index=chunk.index
        )
    difference = decompress_chunk(chunk, frame)  # exactly raw_size bytes, or ChunkDecodeError / ChunkSizeError
    rebuilt = bytearray(chunk.raw_size_bytes)
    np.add(np.frombuffer(base, np.uint8), np.frombuffer(difference, np.uint8), out=np.frombuffer(rebuilt, np.uint8))  # wraps mod 256
    if hashlib.sha256(rebuilt).digest() != sha256:
        raise ChunkIntegrityError(
            f"chunk {chunk.index} of layer {chunk.layer_index}: rebuilt from its delta, its sha256 differs; fetching it whole",
            layer_index=chunk.layer_index,
            chunk_index=chunk.index,
        )
    return rebuilt


def encode_delta(base_digest: str, entries: Sequence[tuple[int, int, int, bytes, bytes]]) -> bytes:
    """A whole delta file: entries (chunk index, method, base raw offset, sha256, frame), ascending chunk index."""
    head = bytearray(DELTA_PREAMBLE.pack(DELTA_MAGIC, DELTA_VERSION, 0, len(entries), bytes.fromhex(base_digest)))
    offset = 0
    for chunk_index, method, base_offset, sha, frame in entries:
        head += DELTA_ENTRY.pack(chunk_index, method, base_offset, offset, len(frame), sha)
        offset += len(frame)
    head += bytes(delta_data_offset(len(entries)) - len(head))
    return bytes(head) + b"".join(entry[4] for entry in entries)


def summarize_delta(data: bytes | memoryview, file_size_bytes: int) -> dict[str, Any]:
    """A delta file's summary for ``inspect``: its base, entries by method and their bytes."""
    index = parse_delta_index(data, file_size_bytes=file_size_bytes)
    by_method = {
        m.name.lower(): {"chunks": int((index.method == m).sum()), "bytes": int(index.size[index.method == m].sum())} for m in DeltaMethod
    }
    return {
        "kind": "delta",
        "base_digest": index.base_digest,
        "entries": len(index),
        "index_bytes": delta_index_size(len(index)),
        "index_sha256": hashlib.sha256(bytes(data[: delta_index_size(len(index))])).hexdigest(),
        "file_bytes": file_size_bytes,
        "by_method": by_method,
    }
