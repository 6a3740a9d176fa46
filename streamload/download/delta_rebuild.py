"""Chunks rebuilt from a delta file's frames and a cached version's store, and written to the new model's store.

``DeltaStream`` (``delta_stream.py``) hands each batch of frames to ``DeltaRebuilder.run`` on a worker thread: per
frame, the base's stored bytes under it (each base chunk checked against its journaled xxh3, read from the base's store
opened read-only), the chunk rebuilt and checked against its sha256 (``formats/delta_file.py``), written to the store;
the xxh3 of what was written goes back to be journaled. Costs: per chunk one zstd frame decoded, one byte-wise add, a
sha256 and an xxh3 of its raw bytes.
"""

from __future__ import annotations

import logging
import os
from typing import Protocol

import numpy as np
import xxhash

from ..cache.model_cache import ModelCache
from ..cache.reuse import HeldModel
from ..errors import FormatError, StreamloadError
from ..formats import Manifest
from ..formats.chunk_table import ChunkTable
from ..formats.delta import DeltaIndex, DeltaMethod, rebuild_chunk

logger = logging.getLogger(__name__)


class DeltaBody(Protocol):
    """A body of the delta file, read forward (``delta_stream._Body``)."""

    def read(self, offset: int, size: int) -> bytes: ...


class DeltaRebuilder:
    """Rebuilds chunks from frames and the base's store (worker thread) and writes them (the download's group committer
    journals them once they are handed over)."""

    def __init__(self, held: HeldModel, manifest: Manifest, cache: ModelCache, table: ChunkTable) -> None:
        self.held, self.manifest, self.cache = held, manifest, cache
        self.position_of = {int(i): p for p, i in enumerate(table.index.tolist())}
        self.table = table
        base = held.manifest.chunk_table
        keep = base.pass_index == 0
        self.base_offsets, self.base_ends = base.raw_offset[keep], base.raw_offset[keep] + base.raw_size[keep]
        self.base_index = base.index[keep]
        self.progressive = [(t.raw_offset, t.raw_end) for t in held.manifest.tensors if t.coarse_shift is not None]
        self.fd = -1

    def _base_bytes(self, raw_offset: int, raw_size: int) -> bytes | None:
        """The base's store over [raw_offset, raw_offset + raw_size), every base chunk under it checked; None otherwise."""
        end = raw_offset + raw_size
        if any(a < end and raw_offset < b for a, b in self.progressive):
            return None
        first = int(np.searchsorted(self.base_ends, raw_offset, side="right"))
        last = int(np.searchsorted(self.base_offsets, end, side="left"))
        if first >= last or self.base_offsets[first] > raw_offset or self.base_ends[last - 1] < end:
            return None
        pieces = []
        for position in range(first, last):
            index, start, stop = int(self.base_index[position]), int(self.base_offsets[position]), int(self.base_ends[position])
            digest = self.held.journal.get(index)
            if digest is None:
                return None
            data = os.pread(self.fd, stop - start, start)
            if len(data) != stop - start or xxhash.xxh3_64_intdigest(data) != digest:
                return None
            pieces.append(data)
        joined = b"".join(pieces)
        start = raw_offset - int(self.base_offsets[first])
        return joined[start : start + raw_size]

    def run(self, body: DeltaBody, index: DeltaIndex, entries: list[int]) -> tuple[list[int | None], BaseException | None]:
        """(worker thread) Read and rebuild these entries, writing each rebuilt chunk to the store: per entry read, the
        xxh3 of the chunk written (None: refused), and the failure that stopped the reading (the rest unread)."""
        results: list[int | None] = []
        if self.fd == -1:
            try:
                self.fd = os.open(self.held.store_path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                self.fd = -2
        for entry in entries:
            try:
                frame = body.read(index.data_offset + int(index.offset[entry]), int(index.size[entry]))
            except (StreamloadError, OSError) as exc:
                return results, exc
            results.append(self._rebuild(index, entry, frame))
        return results, None

    def _rebuild(self, index: DeltaIndex, entry: int, frame: bytes) -> int | None:
        position = self.position_of.get(int(index.chunk_index[entry]))
        if position is None:
            return None
        chunk = self.table.entry(position)
        method = int(index.method[entry])
        base = None
        if method == DeltaMethod.DIFFERENCE:
            base = self._base_bytes(int(index.base_raw_offset[entry]), chunk.raw_size_bytes) if self.fd >= 0 else None
            if base is None:
                logger.info("chunk %d: the cached base's bytes under it are missing or damaged; it is fetched whole", chunk.index)
                return None
        try:
            raw = rebuild_chunk(chunk, method, frame, index.sha256[entry].tobytes(), base)
        except FormatError as exc:
            logger.warning("%s; it is fetched whole", exc)
            return None
        self.cache.write_chunks(chunk.raw_offset, [raw])
        return xxhash.xxh3_64_intdigest(raw)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1
