"""Fetching an update as a delta: the chunks a cached version does not hold, rebuilt from it and a delta file.

When the new model's manifest lists a delta file against a version the cache holds (``formats/delta.py``), ``open_delta``
reads that file's index from beside the model's URL (one open-ended request from byte 0: ``delta_file_name``) and
checks its sha256 against the manifest's (so the index, and every rebuilt chunk through the raw digests it carries, is
pinned by the new model's digest). The ``DeltaStream`` then owns the pending chunks the index has entries for (taken
from the scheduler) and goes on reading their frames in file order beside the download: on the same body while the
next frame is near, on a new ranged request past a larger gap (a server that ignores Range sends the whole delta file
on the first request, read forward); rows demanded out of order get an extra ranged request. Each chunk is rebuilt
from the base's stored bytes (each base chunk checked against its journaled xxh3 first), checked against its sha256,
written to the store and handed over to the download (its ``Handover``, drained by its completion route: scheduler,
readiness, group commit: a kill at any point resumes with what is journaled), so layers become ready in execution order
as their chunks land. Anything that fails (no delta file: 404; a damaged index or frame: a hash that differs; a base
chunk damaged or missing) is handed back, and the download fetches it whole from the model file. The base's files are only read.

Costs: per rebuilt chunk one zstd frame decoded, one byte-wise add, a sha256 and an xxh3 of its raw bytes. Threads:
each batch of frames is read and rebuilt on a worker thread (``asyncio.to_thread``); the rest runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections.abc import Coroutine, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache.model_cache import ModelCache
from ..cache.reuse import HeldModel, read_held_model
from ..errors import FormatError, StreamloadError
from ..formats import Manifest
from ..formats.chunk_table import ChunkTable
from ..formats.delta import (
    DELTA_PREAMBLE_SIZE_BYTES,
    DeltaBase,
    DeltaIndex,
    delta_file_name,
    index_size_needed,
    parse_delta_index,
    read_delta_bases,
)
from ..stats import DownloadStats
from ..transport.httputil import RetryPolicy
from ..transport.source import Source, SpanReader
from .delta_rebuild import DeltaRebuilder
from .landed import Handed, Handover

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


def _held_base(cache_root: Path, bases: list[DeltaBase]) -> tuple[DeltaBase, HeldModel] | None:
    for base in bases:
        held = read_held_model(cache_root, base.digest)
        if held is not None:
            return base, held
    return None


async def find_delta_base(cache_root: Path, manifest_bytes: bytes | memoryview) -> tuple[DeltaBase, HeldModel] | None:
    """The first base the manifest lists a delta file against that the cache holds (its header and journal), or None."""
    return await asyncio.to_thread(lambda: _held_base(cache_root, read_delta_bases(manifest_bytes)))  # parsing: off the loop


class _Body:
    """A body of the delta file, read forward by one worker thread at a time, reopened on a ranged request past a gap."""

    def __init__(self, source: Source, reader: SpanReader) -> None:
        self.source, self.reader = source, reader
        self.received = 0  # bytes read from the network (skipped ones too)
        self.waited_s = 0.0  # blocked on the network: tells the group committer the download is network-bound

    def read(self, offset: int, size: int) -> bytes:
        """(worker thread) The file's bytes [offset, offset + size), on the open body."""
        before, started = self.reader.position, time.perf_counter()
        buffer = bytearray(size)
        try:
            self.reader.read_into(offset, memoryview(buffer))
        finally:
            self.received += max(0, self.reader.position - before)
            self.waited_s += time.perf_counter() - started
        return bytes(buffer)

    async def seek(self, offset: int, end: int) -> None:
        """Go on from ``offset``: on the open body when it is at most MAX_GAP_BYTES before it, else on a new request
        for [offset, end)."""
        if self.reader.whole_file or 0 <= offset - self.reader.position <= MAX_GAP_BYTES:
            return
        self.reader.close()
        self.reader = await self.source.open_span(offset, end)


async def open_delta(
    found: tuple[DeltaBase, HeldModel],
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
) -> DeltaStream | None:
    """Read and check the delta file's index (one request from byte 0, left open for the frames); the stream of the
    pending chunks (positions in ``table``) it has entries for, or None: no entry for any, or no usable delta file
    (logged: its chunks are fetched whole)."""
    base, held = found
    from ..transport.http_source import HttpSource

    source = HttpSource(delta_url(url, base.digest, manifest.digest), retry, session, headers)
    body: _Body | None = None
    try:
        body = _Body(source, await source.open_span(0, None))
        first = await asyncio.to_thread(body.read, 0, DELTA_PREAMBLE_SIZE_BYTES)
        size = index_size_needed(first)
        index_bytes = first + await asyncio.to_thread(body.read, DELTA_PREAMBLE_SIZE_BYTES, size - DELTA_PREAMBLE_SIZE_BYTES)
        if hashlib.sha256(index_bytes).digest() != base.index_sha256:
            raise FormatError("its index differs from the one the model's manifest names (a damaged or stale delta file)")
        index = parse_delta_index(index_bytes, file_size_bytes=base.size_bytes)
        wanted = _wanted_entries(index, table, pending)
    except (StreamloadError, OSError) as exc:
        logger.warning("the delta against the cached %s cannot be used (%s): the chunks it holds are fetched whole", base.digest[:12], exc)
        wanted = None
    finally:
        if body is not None:
            stats.bytes_delta += body.received
            stats.bytes_downloaded += body.received
            body.received = 0
    if body is None or wanted is None or not len(wanted):
        if body is not None:
            body.reader.close()
        await source.close()
        return None
    position_of = np.full(int(table.index.max()) + 1, -1, np.int64)
    position_of[table.index] = np.arange(len(table))
    positions = position_of[index.chunk_index[wanted]]
    return DeltaStream(source, body, index, wanted, positions, DeltaRebuilder(held, manifest, cache, table), stats, base.digest)


PENDING, TAKEN, SETTLED = 0, 1, 2


class DeltaStream:
    """The delta's frames for the chunks it owns (``positions``, taken from the scheduler), fetched in file order beside
    the download, and on extra ranged requests for chunks demanded out of order (rows); each batch rebuilt on a worker
    thread, then handed over to the download (positions, xxh3 digests, frame bytes) or given back."""

    def __init__(
        self,
        source: Source,
        body: _Body,
        index: DeltaIndex,
        wanted: np.ndarray,
        positions: np.ndarray,
        rebuilder: DeltaRebuilder,
        stats: DownloadStats,
        base_digest: str,
    ) -> None:
        self.source, self.body, self.index, self.wanted, self.positions = source, body, index, wanted, positions
        self.rebuilder, self.stats, self.base_digest = rebuilder, stats, base_digest
        self.state = bytearray(len(wanted))
        self.layers = rebuilder.table.layer[positions].tolist()  # per entry: the layer of its chunk
        self.number_of = {int(i): n for n, i in enumerate(index.chunk_index[wanted].tolist())}  # chunk index -> entry number
        self._tasks: set[asyncio.Task[None]] = set()
        self._bodies: set[_Body] = {body}
        self._handover: Handover | None = None  # the download's: rebuilt chunks, and those given back (``start``)

    def start(self, handover: Handover) -> None:
        """Read the frames beside the download: rebuilt chunks, and failed ones given back, go on its ``handover``."""
        self._handover = handover
        self._spawn(self._run())

    def _handing(self) -> Handover:
        assert self._handover is not None, "frames are read only once started"
        return self._handover

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name=f"streamload delta {self.base_digest[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _frame_range(self, numbers: list[int]) -> tuple[int, int]:
        entries, data_offset = self.wanted[numbers], self.index.data_offset
        return data_offset + int(self.index.offset[entries[0]]), data_offset + int(
            self.index.offset[entries[-1]] + self.index.size[entries[-1]]
        )

    async def _run(self) -> None:
        """Every pending entry in order, on the open body (reopened past a gap)."""
        numbers = list(range(len(self.wanted)))
        batch: list[int] = []
        try:
            cursor = 0
            while cursor < len(numbers):
                batch = []
                size = 0
                layer = None  # a batch stays in one layer: each lands (and may complete its layer) as soon as it is rebuilt
                while cursor < len(numbers) and len(batch) < MAX_BATCH_ENTRIES and size < BATCH_BYTES:
                    if layer is not None and self.layers[cursor] != layer:
                        break
                    layer = self.layers[cursor]
                    if self.state[cursor] == PENDING:
                        self.state[cursor] = TAKEN
                        batch.append(cursor)
                        size += int(self.index.size[self.wanted[cursor]])
                    cursor += 1
                if batch:
                    await self.body.seek(self._frame_range(batch)[0], self._frame_range([batch[0], len(numbers) - 1])[1])
                    await self._process(self.body, batch)
        except (StreamloadError, OSError) as exc:
            logger.warning("the delta against the cached %s failed (%s): the rest is fetched whole", self.base_digest[:12], exc)
        finally:  # what nobody took, and what this loop took and did not settle (extra requests settle their own)
            self._give_back([n for n in numbers if self.state[n] == PENDING] + batch)
            self.body.reader.close()

    def demand(self, chunk_indices: Sequence[int]) -> None:
        """Chunks someone waits for out of order (rows): their frames on an extra ranged request, now."""
        if self.body.reader.whole_file or self._handover is None:
            return  # forward only: they come in order (or nothing is read yet)
        numbers = sorted(n for n in (self.number_of.get(int(i)) for i in chunk_indices) if n is not None and self.state[n] == PENDING)
        if numbers:
            for number in numbers:
                self.state[number] = TAKEN
            self._spawn(self._fetch_extra(numbers))

    async def _fetch_extra(self, numbers: list[int]) -> None:
        runs: list[list[int]] = [[numbers[0]]]
        for number in numbers[1:]:
            if self._frame_range([number])[0] - self._frame_range([runs[-1][-1]])[1] > MAX_GAP_BYTES:
                runs.append([])
            runs[-1].append(number)
        body = None
        try:
            for run in runs:
                start, end = self._frame_range(run)
                body = _Body(self.source, await self.source.open_span(start, end))
                self._bodies.add(body)
                await self._process(body, run)
                body.reader.close()
                self._bodies.discard(body)
                body = None
        except (StreamloadError, OSError) as exc:
            logger.warning("an extra request to the delta file failed (%s): its chunks are fetched whole", exc)
        finally:
            if body is not None:
                body.reader.close()
                self._bodies.discard(body)
            self._give_back(numbers)

    async def _process(self, body: _Body, batch: list[int]) -> None:
        try:
            results, failure = await asyncio.to_thread(self.rebuilder.run, body, self.index, [int(self.wanted[n]) for n in batch])
        finally:
            self.stats.bytes_delta += body.received
            self.stats.bytes_downloaded += body.received
            self.stats.receive_wait_s += body.waited_s
            body.received, body.waited_s = 0, 0.0
        landed = [(n, digest) for n, digest in zip(batch, results, strict=False) if digest is not None]
        refused = [n for n, digest in zip(batch, results, strict=False) if digest is None]
        for n in batch[: len(results)]:
            self.state[n] = SETTLED
        if landed:
            numbers = [n for n, _ in landed]
            frames = int(self.index.size[self.wanted[numbers]].sum())
            self._handing().put(Handed(self.positions[numbers].tolist(), [digest for _, digest in landed], saved_bytes=frames))
        if refused:
            self._handing().put(Handed(self.positions[refused].tolist(), given_back=True))
        if failure is not None:
            raise failure

    def _give_back(self, numbers: list[int]) -> None:
        """Entries of ``numbers`` not settled (pending, or taken by the caller): for the download."""
        left = [n for n in numbers if self.state[n] != SETTLED]
        if left:
            for n in left:
                self.state[n] = SETTLED
            self._handing().put(Handed(self.positions[left].tolist(), given_back=True))

    async def stop(self) -> None:
        """Stop reading (any body is aborted); what did not land is given back."""
        for body in list(self._bodies):
            body.reader.abort()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, StreamloadError, OSError):
                await task
        self.rebuilder.close()
        await self.source.close()


def _wanted_entries(index: DeltaIndex, table: ChunkTable, pending: np.ndarray) -> np.ndarray:
    """Entries (positions in the index) for pending pass-0 chunks, in order."""
    pending_indices = table.index[pending[table.pass_index[pending] == 0]]
    return np.flatnonzero(np.isin(index.chunk_index, pending_indices))
