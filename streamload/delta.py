"""Fetching an update as a delta: the chunks a cached version does not hold, rebuilt from it and a delta file.

When the new model's manifest lists a delta file against a version the cache holds (``formats/delta.py``), ``fetch_delta``
reads that file's index from beside the model's URL (one open-ended request from byte 0: ``delta_file_name``), checks
its sha256 against the manifest's (so the index, and every rebuilt chunk through the raw digests it carries, is pinned
by the new model's digest), and goes on reading the frames of the chunks the cache lacks, in file order: on the same
body while the next frame is near, on a new ranged request past a larger gap (a server that ignores Range sends the
whole delta file on the first request, read forward). Each chunk is rebuilt from the base's stored bytes (each base
chunk checked against its journaled xxh3 first), checked against its sha256, written to the store and journaled (in
groups, fdatasync first): a kill at any point resumes with what is journaled. Anything that fails (no delta file: 404;
a damaged index or frame: a hash that differs; a base chunk damaged or missing) leaves its chunks to the download,
which fetches them whole from the model file. The base's files are only read.

Costs: per rebuilt chunk one zstd frame decoded, one byte-wise add, a sha256 and an xxh3 of its raw bytes. Threads:
the reads and the rebuilding run on one worker thread (``asyncio.to_thread``) per batch; the rest on the event loop.
It runs before the download starts, so the chunks it rebuilds count as cached for the download.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from .cache import COMMIT_INTERVAL_S, ModelCache
from .errors import FormatError, StreamloadError
from .formats import Manifest
from .formats.chunk_table import ChunkTable
from .formats.delta import (
    DELTA_PREAMBLE_SIZE_BYTES,
    DeltaBase,
    DeltaIndex,
    DeltaMethod,
    delta_file_name,
    index_size_needed,
    parse_delta_index,
    read_delta_bases,
    rebuild_chunk,
)
from .httputil import RetryPolicy
from .reuse import HeldModel, read_held_model
from .stats import DownloadStats
from .transport import Source, SpanReader

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

MAX_GAP_BYTES = 64 << 10  # a body reads over this much it does not need rather than open another request
BATCH_BYTES = 256 << 10  # frames read and rebuilt per trip to the worker thread (at most MAX_BATCH_ENTRIES)
MAX_BATCH_ENTRIES = 32


def delta_url(model_url: str, base_digest: str, target_digest: str) -> str:
    """The delta file's URL: beside the model's, named by ``delta_file_name`` (query and fragment dropped)."""
    parts = urllib.parse.urlsplit(model_url)
    directory, _, name = parts.path.rpartition("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{directory}/{delta_file_name(name, base_digest, target_digest)}", "", ""))


@dataclasses.dataclass(slots=True)
class DeltaOutcome:
    journaled: dict[int, int] = dataclasses.field(default_factory=dict)  # chunk index -> xxh3 of its raw bytes
    bytes_received: int = 0
    base_digest: str | None = None


def _held_base(cache_root: Path, bases: list[DeltaBase]) -> tuple[DeltaBase, HeldModel] | None:
    for base in bases:
        held = read_held_model(cache_root, base.digest)
        if held is not None:
            return base, held
    return None


async def find_delta_base(cache_root: Path, manifest_bytes: bytes | memoryview) -> tuple[DeltaBase, HeldModel] | None:
    """The first base the manifest lists a delta file against that the cache holds (its header and journal), or None."""
    return await asyncio.to_thread(_held_base, cache_root, read_delta_bases(manifest_bytes))


async def fetch_delta(
    found: tuple[DeltaBase, HeldModel] | None,
    *,
    url: str,
    manifest: Manifest,
    cache: ModelCache,
    table: ChunkTable,
    pending: np.ndarray,
    retry: RetryPolicy,
    session: aiohttp.ClientSession | None,
    headers: Mapping[str, str] | None,
    stats: DownloadStats,
) -> DeltaOutcome:
    """Rebuild what the delta against ``found`` (``find_delta_base``) can of the pending chunks (positions in ``table``);
    never raises for a delta that cannot be had or used (its chunks are left to the download)."""
    outcome = DeltaOutcome()
    if found is None or not len(pending):
        return outcome
    base, held = found
    outcome.base_digest = base.digest
    from .http_source import HttpSource

    source = HttpSource(delta_url(url, base.digest, manifest.digest), retry, session, headers)
    try:
        await _fetch(source, base, held, manifest, cache, table, pending, stats, outcome)
    except (StreamloadError, OSError) as exc:
        logger.warning("the delta against the cached %s cannot be used (%s): the rest is fetched whole", base.digest[:12], exc)
    finally:
        await source.close()
    stats.bytes_delta += outcome.bytes_received
    stats.bytes_downloaded += outcome.bytes_received
    stats.chunks_delta += len(outcome.journaled)
    if outcome.journaled:
        logger.info(
            "rebuilt %d chunks from the cached %s and %d bytes of delta", len(outcome.journaled), base.digest[:12], outcome.bytes_received
        )
    return outcome


class _Body:
    """The delta file's body being read forward, reopened on a ranged request past a gap."""

    def __init__(self, source: Source, reader: SpanReader, outcome: DeltaOutcome) -> None:
        self.source, self.reader, self.outcome = source, reader, outcome

    def read(self, offset: int, size: int) -> bytes:
        """(worker thread) The file's bytes [offset, offset + size), on the open body."""
        before = self.reader.position
        buffer = bytearray(size)
        try:
            self.reader.read_into(offset, memoryview(buffer))
        finally:
            self.outcome.bytes_received += max(0, self.reader.position - before)
        return bytes(buffer)

    async def seek(self, offset: int, end: int) -> None:
        """Go on from ``offset``: on the open body when it is at most MAX_GAP_BYTES before it, else on a new request
        for [offset, end)."""
        if self.reader.whole_file or 0 <= offset - self.reader.position <= MAX_GAP_BYTES:
            return
        self.reader.close()
        self.reader = await self.source.open_span(offset, end)


async def _fetch(
    source: Source,
    base: DeltaBase,
    held: HeldModel,
    manifest: Manifest,
    cache: ModelCache,
    table: ChunkTable,
    pending: np.ndarray,
    stats: DownloadStats,
    outcome: DeltaOutcome,
) -> None:
    reader = await source.open_span(0, None)
    body = _Body(source, reader, outcome)
    rebuilder: _Rebuilder | None = None
    try:
        first = await asyncio.to_thread(body.read, 0, DELTA_PREAMBLE_SIZE_BYTES)
        size = index_size_needed(first)
        index_bytes = first + await asyncio.to_thread(body.read, DELTA_PREAMBLE_SIZE_BYTES, size - DELTA_PREAMBLE_SIZE_BYTES)
        if hashlib.sha256(index_bytes).digest() != base.index_sha256:
            raise FormatError("its index differs from the one the model's manifest names (a damaged or stale delta file)")
        index = parse_delta_index(index_bytes, file_size_bytes=base.size_bytes)
        if index.base_digest != base.digest:
            raise FormatError("it is against another base")  # pragma: no cover - the index sha256 pins it
        wanted = _wanted_entries(index, table, pending)
        if not len(wanted):
            return
        rebuilder = _Rebuilder(held, manifest, cache, table)
        data_offset = index.data_offset
        batch: list[int] = []
        batch_bytes = 0
        last_commit = time.monotonic()
        for number, entry in enumerate(wanted.tolist()):
            batch.append(entry)
            batch_bytes += int(index.size[entry])
            is_last = number == len(wanted) - 1
            if batch_bytes < BATCH_BYTES and len(batch) < MAX_BATCH_ENTRIES and not is_last:
                continue
            start = data_offset + int(index.offset[batch[0]])
            remaining_end = data_offset + int(index.offset[wanted[-1]] + index.size[wanted[-1]])
            await body.seek(start, remaining_end)
            records = await asyncio.to_thread(rebuilder.run, body, index, batch, data_offset)
            rebuilder.records.extend(records)
            batch, batch_bytes = [], 0
            if time.monotonic() - last_commit >= COMMIT_INTERVAL_S or is_last:
                await asyncio.to_thread(rebuilder.commit, outcome)
                last_commit = time.monotonic()
    finally:
        body.reader.close()
        if rebuilder is not None:
            await asyncio.to_thread(rebuilder.commit, outcome)


def _wanted_entries(index: DeltaIndex, table: ChunkTable, pending: np.ndarray) -> np.ndarray:
    """Entries (positions in the index) for pending pass-0 chunks, in order."""
    pending_indices = table.index[pending[table.pass_index[pending] == 0]]
    return np.flatnonzero(np.isin(index.chunk_index, pending_indices))


class _Rebuilder:
    """Rebuilds chunks from frames and the base's store (worker thread), writes them, journals them in groups."""

    def __init__(self, held: HeldModel, manifest: Manifest, cache: ModelCache, table: ChunkTable) -> None:
        self.held, self.manifest, self.cache = held, manifest, cache
        self.position_of = {int(i): p for p, i in enumerate(table.index.tolist())}
        self.table = table
        base = held.manifest.chunk_table
        keep = base.pass_index == 0
        self.base_offsets, self.base_ends = base.raw_offset[keep], base.raw_offset[keep] + base.raw_size[keep]
        self.base_index = base.index[keep]
        self.progressive = [(t.raw_offset, t.raw_end) for t in held.manifest.tensors if t.coarse_shift is not None]
        self.records: list[tuple[int, int]] = []
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

    def run(self, body: _Body, index: DeltaIndex, entries: list[int], data_offset: int) -> list[tuple[int, int]]:
        """(worker thread) Read and rebuild these entries; the (chunk index, xxh3) of each one written."""
        records = []
        if self.fd < 0:
            try:
                self.fd = os.open(self.held.store_path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                self.fd = -2
        for entry in entries:
            frame = body.read(data_offset + int(index.offset[entry]), int(index.size[entry]))
            position = self.position_of.get(int(index.chunk_index[entry]))
            if position is None:
                continue
            chunk = self.table.entry(position)
            method = int(index.method[entry])
            base = None
            if method == DeltaMethod.DIFFERENCE:
                if self.fd < 0:
                    continue
                base = self._base_bytes(int(index.base_raw_offset[entry]), chunk.raw_size_bytes)
                if base is None:
                    continue
            try:
                raw = rebuild_chunk(chunk, method, frame, index.sha256[entry].tobytes(), base)
            except FormatError as exc:
                logger.warning("%s; it is fetched whole", exc)
                continue
            self.cache.write_chunks(chunk.raw_offset, [raw])
            records.append((chunk.index, xxhash.xxh3_64_intdigest(raw)))
        return records

    def commit(self, outcome: DeltaOutcome) -> None:
        """(worker thread) Make the rebuilt chunks durable, then journal them."""
        if self.records:
            self.cache.commit_chunks(self.records)
            outcome.journaled.update(self.records)
            self.records = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
