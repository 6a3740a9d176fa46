"""The chunk pipeline: receive -> verify -> decompress -> store on pool threads, one route back to the event loop.

Every source goes through here. Leader/follower: a pool thread takes the next
chunk of a span under the span's lock, receives it into its own buffer from the
span's reader, lets go of the lock, and verifies (sha256), decompresses and
stores that chunk while the next thread receives the one after. Chunks are
received in file order, so layers complete in execution order; each chunk stays
in one core's cache from socket to store. Nothing unverified is decompressed or
written; a refinement chunk is folded into the coarse levels its pass-0 chunks
stored (``ModelCache.fold_refinement``, with the plan's shift), after those are in the store. ``run_span`` yields each
finished chunk (stored, or failed its hash) to the event loop as it lands,
waking the loop once per batch, not per chunk.

Costs: one copy of each compressed chunk (connection to buffer), one of each raw
chunk (pwrite into the page cache); one receive buffer and one zstd context per
pool thread; threads = ``threads``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import xxhash
import zstandard

from ..errors import ChunkIntegrityError, RetryableError, StalledError
from ..formats import ChunkEntry, decompress_chunks, verify_chunk
from ..formats.chunk_table import ChunkTable, EntriesAt, column_at
from ..formats.constants import MIN_ZSTD_FRAME_SIZE_BYTES
from ..formats.reader import decompress_batch
from ..stats import DownloadStats
from ..transport.source import SpanReader
from .landed import Landed, LandedQueue
from .refinements import RefinementPlan
from .span import Span

if TYPE_CHECKING:
    from ..cache.model_cache import ModelCache


BATCH_BYTES = 512 << 10  # consecutive chunks smaller than this are received and processed together
# and decompressed together up to this many raw bytes (one allocation per batch): a batch of real chunks (at most ~3x)
# stays far below it; chunks of zeros (~5,000x each) would otherwise take gigabytes at once. A single chunk is a batch
# whatever its size (at most the manifest's chunk_size, itself at most 64 MiB)
BATCH_RAW_BYTES = 4 << 20
MAX_BATCH_CHUNKS = BATCH_BYTES // MIN_ZSTD_FRAME_SIZE_BYTES  # more never fit in BATCH_BYTES
LOOKAHEAD_CHUNKS = 4096  # chunks looked at first for the next batch: a batch of 256-byte chunks holds ~2,000
JOIN_BELOW_BYTES = 1024  # chunks this small on average are written as one joined piece
HASHLIB_GIL_MIN_BYTES = 2048  # CPython's hashlib releases the GIL only for inputs of at least this many bytes


class ChunkPipeline:
    """Pool threads that turn received chunks into stored ones, for every span of one model."""

    def __init__(
        self,
        *,
        data_offset: int,
        chunk_size_bytes: int,
        store: ModelCache,
        plan: RefinementPlan,
        stats: DownloadStats,
        threads: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.data_offset = data_offset
        # compressed chunks can exceed the raw size a little; small chunks come in batches. A thread's buffer grows to
        # this on its first large chunk: one that only ever receives rows keeps a small one
        self.buffer_bytes = max(BATCH_BYTES, chunk_size_bytes + (chunk_size_bytes >> 3))
        self.write_chunks = store.write_chunks
        self.stats = stats
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streamload-verify")
        # per batch: its chunk indices and (receive start, receive end, verify start, stored) (perf_counter)
        self._batch_times: list[tuple[np.ndarray, tuple[float, float, float, float]]] = []
        self._local = threading.local()
        # batches of small chunks are processed one at a time: their work holds the GIL (hashlib lets it go only for
        # inputs of 2 KiB or more), so more threads at it only contend for the GIL, and take CPU from the receivers
        self._serial = threading.Lock()
        # refinements: the store folds one into the coarse levels with its tensor's shift; requires names the pass-0
        # chunks under it. The scheduler hands one out only once those are done, except in a whole-file span, where
        # they come earlier in the same span: a refinement then waits for them here (received before it, under the
        # span's lock)
        self.fold_refinement = store.fold_refinement if plan.requires else None
        self.shift_of = plan.shift_of
        self.requires = plan.requires
        self._bases = {base for bases in self.requires.values() for base in bases}
        self._bases_lock = threading.Lock()
        self._bases_in_flight: dict[int, threading.Event] = {}
        self._bases_failed: set[int] = set()
        self._bases_stored: set[int] = set()

    @property
    def chunk_times(self) -> dict[int, tuple[float, float, float, float]]:
        """Chunk index -> (receive start, receive end, verify start, stored) (perf_counter), one tuple shared by a batch."""
        spans: dict[int, tuple[float, float, float, float]] = {}
        for indices, times in list(self._batch_times):
            spans.update(dict.fromkeys(indices.tolist(), times))
        return spans

    async def run_span(self, span: Span, reader: SpanReader, threads: int) -> AsyncIterator[Landed]:
        """Receive, verify, decompress and store a span on ``threads`` pool threads, yielding chunks as they land
        (a list per batch: one chunk, or several small consecutive ones).

        Raises the span's first failure after the last outcome. When the iteration
        ends (or is closed early), no thread touches the span, its reader or the
        store any more; ``span.received`` says how many chunks came off the connection.
        The caller closes the reader (or, the span done, goes on reading its body).
        """
        span.abort = reader.abort
        landed = LandedQueue(self.loop)
        count = max(1, min(threads, len(span.positions)))
        jobs = asyncio.gather(
            *(self.loop.run_in_executor(self.pool, self._pump, span, reader, landed) for _ in range(count)), return_exceptions=True
        )
        waiter: asyncio.Future[None] | None = None
        try:
            while True:
                while landed.batches:
                    yield landed.batches.popleft()
                if jobs.done():
                    if not landed.batches:  # every thread's last batch was queued before its job completed
                        break
                    continue
                if waiter is None or waiter.done():
                    waiter = landed.next_wake()
                await asyncio.wait([jobs, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waiter is not None:
                waiter.cancel()
            if not jobs.done():  # cancelled, or the caller stopped iterating
                span.stop()
                reader.abort()  # a thread blocked on the connection returns at once
                await asyncio.wait([jobs])
            self.stats.receive_wait_s += span.unreported_wait_s  # no thread touches the span now
            span.unreported_wait_s = 0.0
        if span.error is not None:
            raise span.error

    def _pump(self, span: Span, reader: SpanReader, landed: LandedQueue) -> None:
        """One pool thread's share of a span: take the next batch, receive it, let go of the reader, process it.

        A batch is one chunk, or several consecutive small ones up to BATCH_BYTES: one read per
        run of them that lies back to back in the file, one store write and one wake-up of the
        loop for all of them (small chunks would otherwise spend their time handing the GIL and
        the reader between threads, one system call each).
        """
        table = span.table
        try:
            while True:
                with span.lock:
                    first = span.received
                    if span.cut or first == len(span.positions):
                        return
                    batch, sizes = self._next_batch(table, span.positions, first)
                    if self._bases:
                        with self._bases_lock:
                            for index in column_at(table.index, batch).tolist():
                                if index in self._bases:
                                    self._bases_in_flight.setdefault(index, threading.Event())
                    view = self._buffer(int(sizes.sum()))
                    waiting = time.perf_counter()
                    count, position, failure = self._receive(reader, table, batch, sizes, view)
                    batch, sizes = batch[:count], sizes[:count]
                    span.received = first + count
                    received = time.perf_counter()
                    if not batch:  # nothing arrived: the wait is reported when the span ends (``run_span``)
                        span.unreported_wait_s += received - waiting
                if batch:
                    try:
                        with self._serial if self._gil_bound(batch, sizes) else contextlib.nullcontext():
                            outcomes = self.process(table, batch, sizes, view[:position], waiting, received)
                        landed.post(outcomes)
                    finally:
                        self._settle_bases(table, batch)
                if failure is not None:
                    span.stop(failure)
                    return
        except BaseException as exc:  # a chunk that decodes wrong after its hash matched, a full disk, a bug: fatal
            span.stop(exc)

    def _gil_bound(self, batch: Sequence[int], sizes: np.ndarray) -> bool:
        """Whether a batch's processing holds the GIL nearly throughout: many chunks under HASHLIB_GIL_MIN_BYTES. Never
        with refinements, which can wait in ``process`` for chunks that another thread is processing."""
        return len(batch) > 1 and not self._bases and int(sizes.sum()) < HASHLIB_GIL_MIN_BYTES * len(batch)

    @staticmethod
    def _next_batch(table: ChunkTable, positions: Sequence[int], first: int) -> tuple[Sequence[int], np.ndarray]:
        """The chunks from ``first`` on that fit in BATCH_BYTES and BATCH_RAW_BYTES (at least one) and their sizes (under
        the span's lock).
        Looks ahead a few batches' worth of small chunks at a time, not MAX_BATCH_CHUNKS (~29k of them) each time."""
        ahead = LOOKAHEAD_CHUNKS
        while True:
            rest = positions[first : first + ahead]
            sizes = column_at(table.size, rest)
            ends, raw_ends = np.cumsum(sizes), np.cumsum(column_at(table.raw_size, rest))
            if ends[-1] > BATCH_BYTES or raw_ends[-1] > BATCH_RAW_BYTES or len(rest) < ahead or ahead >= MAX_BATCH_CHUNKS:
                fits = min(np.searchsorted(ends, BATCH_BYTES, side="right"), np.searchsorted(raw_ends, BATCH_RAW_BYTES, side="right"))
                count = max(1, int(fits))
                return rest[:count], sizes[:count]
            ahead = min(4 * ahead, MAX_BATCH_CHUNKS)

    def _receive(
        self, reader: SpanReader, table: ChunkTable, batch: Sequence[int], sizes: np.ndarray, view: memoryview
    ) -> tuple[int, int, BaseException | None]:
        """Read a batch into ``view``, one read per run of chunks back to back in the file (under the span's lock).

        Returns how many whole chunks arrived, their bytes, and the failure that stopped the rest
        (a failure keeps the whole chunks that arrived before it).
        """
        offsets = column_at(table.offset, batch)
        breaks = (np.flatnonzero(offsets[1:] != offsets[:-1] + sizes[:-1]) + 1).tolist()
        before = (np.cumsum(sizes) - sizes).tolist()  # where each chunk starts in ``view``
        total = int(sizes.sum())
        for run_start, run_end in zip([0, *breaks], [*breaks, len(batch)], strict=True):
            start = self.data_offset + int(offsets[run_start])
            position = before[run_start]
            run_bytes = (before[run_end] if run_end < len(batch) else total) - position
            try:
                reader.read_into(start, view[position : position + run_bytes])
            except (RetryableError, StalledError) as exc:
                arrived = reader.position - start  # whole chunks of this run that arrived before the failure
                count = run_start + int(np.searchsorted(np.cumsum(sizes[run_start:run_end]), arrived, side="right"))
                return count, (before[count] if count < len(batch) else total), exc
        return len(batch), total, None

    def process(
        self, table: ChunkTable, batch: Sequence[int], sizes: np.ndarray, data: memoryview, received_from: float, received_at: float
    ) -> Landed:
        """Verify, decompress and store consecutive chunks (positions in ``table``) whose bytes are ``data``, back to
        back (pool thread). Nothing unverified is ever decompressed or written; runs of chunks that are contiguous in
        the store are written with one pwritev. Python work per chunk: its sha256, its xxh3, nothing else."""
        decompressor = self._decompressor()
        started = time.perf_counter()
        sha256 = hashlib.sha256
        ends = np.cumsum(sizes)
        starts, ends = (ends - sizes).tolist(), ends.tolist()
        digests = b"".join([sha256(data[start:end]).digest() for start, end in zip(starts, ends, strict=True)])
        expected = column_at(table.sha256, batch)
        failed: list[tuple[int, ChunkIntegrityError]] = []
        if digests != expected.tobytes():
            wrong = (np.frombuffer(digests, np.uint8).reshape(expected.shape) != expected).any(axis=1)
            for i in np.flatnonzero(wrong).tolist():
                try:
                    verify_chunk(table.entry(batch[i]), data[starts[i] : ends[i]])  # the error that names the chunk
                except ChunkIntegrityError as exc:
                    failed.append((batch[i], exc))
        verify_s = time.perf_counter() - started
        stored: Sequence[int]
        if not failed:
            stored = batch
            raws = decompress_batch(
                EntriesAt(table, batch), data, decompressor=decompressor, sizes=sizes, raw_sizes=column_at(table.raw_size, batch)
            )
        else:
            refused = {position for position, _ in failed}
            kept = [i for i, position in enumerate(batch) if position not in refused]
            stored = [batch[i] for i in kept]
            pieces = [data[starts[i] : ends[i]] for i in kept]
            raws = decompress_chunks(list(EntriesAt(table, stored)), pieces, decompressor=decompressor) if kept else []
        # what a later process checks the store against
        written = np.fromiter(map(xxhash.xxh3_64_intdigest, raws), np.uint64, len(raws))
        decompressed = time.perf_counter()
        if self.fold_refinement is not None and column_at(table.pass_index, stored).any():
            # the batch's pass-0 chunks are stored (and those failed, settled) first: a refinement of this batch may fold
            # into one of them, and this thread is the one that would store it (waiting for it here never ends)
            passes = column_at(table.pass_index, stored)
            plain = [position for position, pass_index in zip(stored, passes.tolist(), strict=True) if not pass_index]
            later = [(position, raw) for position, pass_index, raw in zip(stored, passes.tolist(), raws, strict=True) if pass_index]
            written = written[passes == 0]
            self._store(table, plain, [raw for raw, pass_index in zip(raws, passes.tolist(), strict=True) if not pass_index])
            batch_passes = column_at(table.pass_index, batch).tolist()
            self._settle_bases(table, [p for p, pass_index in zip(batch, batch_passes, strict=True) if not pass_index])
            stored, (refined, exact) = plain, self._fold(table, later, failed)
        else:
            self._store(table, stored, raws)
            refined, exact = [], []
        if refined:  # folded and written already: reported after the chunks written here
            folded = np.fromiter(map(xxhash.xxh3_64_intdigest, exact), np.uint64, len(exact))
            stored, written = [*stored, *refined], np.concatenate([written, folded])
        stored_at = time.perf_counter()
        self._batch_times.append((column_at(table.index, batch), (received_from, received_at, started, stored_at)))
        return Landed(
            stored,
            written,
            failed,
            ends[-1],
            receive_wait_s=received_at - received_from,
            verify_s=verify_s,
            decompress_s=decompressed - started - verify_s,
            store_s=stored_at - decompressed,
        )

    def _store(self, table: ChunkTable, stored: Sequence[int], raws: list[bytes | memoryview]) -> None:
        """Write verified pass-0 chunks (positions in ``table``) and record the ones refinements wait for."""
        if stored:
            raw_offsets, raw_sizes = column_at(table.raw_offset, stored), column_at(table.raw_size, stored)
            if raw_offsets[-1] + raw_sizes[-1] - raw_offsets[0] == raw_sizes.sum():
                # back to back in the store (ascending, no overlap): one run. Small chunks are joined into one piece first:
                # copying ~2,000 of them costs less than handing them to pwritev one by one
                small = len(raws) > 1 and raw_sizes.sum() <= JOIN_BELOW_BYTES * len(raws)
                self.write_chunks(int(raw_offsets[0]), [b"".join(raws)] if small else raws)
            else:
                self._write_runs(raw_offsets.tolist(), raw_sizes.tolist(), raws)
        if self._bases:
            with self._bases_lock:
                self._bases_stored.update(index for index in column_at(table.index, stored).tolist() if index in self._bases)

    def _fold(
        self, table: ChunkTable, refinements: list[tuple[int, bytes | memoryview]], failed: list[tuple[int, ChunkIntegrityError]]
    ) -> tuple[list[int], list[bytes | memoryview]]:
        """Fold the batch's refinements into the coarse levels in the store, once those are there (the batch's own are
        already): (the refinements folded, their exact bytes). One whose coarse levels failed their hash joins
        ``failed``: it is fetched again, after them."""
        assert self.fold_refinement is not None
        refined: list[int] = []
        exact: list[bytes | memoryview] = []
        for position, raw in refinements:
            chunk = table.entry(position)
            unstored = self._wait_for_bases(chunk)
            if unstored is not None:
                failed.append((position, unstored))
                continue
            refined.append(position)
            exact.append(self.fold_refinement(chunk.raw_offset, raw, self.shift_of[chunk.index]))
        return refined, exact

    def _wait_for_bases(self, chunk: ChunkEntry) -> ChunkIntegrityError | None:
        """Wait until the pass-0 chunks under a refinement that this pipeline is processing are stored; an error when
        one of them failed its hash (the refinement is then fetched again, after it)."""
        for base in self.requires.get(chunk.index, ()):
            with self._bases_lock:
                event = self._bases_in_flight.get(base)
            if event is not None:
                event.wait()
            with self._bases_lock:
                failed = base in self._bases_failed
            if failed:
                return ChunkIntegrityError(
                    f"chunk {chunk.index} refines chunk {base}, which failed its sha256 check; fetching both again",
                    layer_index=chunk.layer_index,
                    chunk_index=chunk.index,
                )
        return None

    def _settle_bases(self, table: ChunkTable, batch: Sequence[int]) -> None:
        """The pass-0 chunks of a processed batch are stored (or failed): wake refinements waiting for them."""
        if not self._bases:
            return
        with self._bases_lock:
            for index in column_at(table.index, batch).tolist():
                event = self._bases_in_flight.pop(index, None)
                if event is not None:
                    if index in self._bases_stored:
                        self._bases_failed.discard(index)
                    else:
                        self._bases_failed.add(index)
                    event.set()

    def _write_runs(self, raw_offsets: list[int], raw_sizes: list[int], raws: list[bytes | memoryview]) -> None:
        """Write chunks with gaps between them in the store: one pwritev per run of contiguous ones."""
        runs: list[tuple[int, list[bytes | memoryview]]] = []  # (store offset, raw pieces back to back)
        run_end = -1
        for raw_offset, raw_size, raw in zip(raw_offsets, raw_sizes, raws, strict=True):
            if raw_offset == run_end:
                runs[-1][1].append(raw)
            else:
                runs.append((raw_offset, [raw]))
            run_end = raw_offset + raw_size
        for offset, pieces in runs:
            self.write_chunks(offset, pieces)

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's zstd context (contexts are not thread-safe, and one per chunk is setup thrown away)."""
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "decompressor", None)
        if decompressor is None:
            decompressor = self._local.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _buffer(self, size_bytes: int) -> memoryview:
        """This thread's receive buffer (allocated once, so its pages stay warm)."""
        buffer: bytearray | None = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < size_bytes:
            grown = self.buffer_bytes if size_bytes > BATCH_BYTES else BATCH_BYTES
            buffer = self._local.buffer = bytearray(max(size_bytes, grown))
        return memoryview(buffer)[:size_bytes]

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
