"""The chunk pipeline: receive -> verify -> decompress -> store on pool threads, one route back to the event loop.

Every source goes through here. Leader/follower: a pool thread takes the next
chunk of a span under the span's lock, receives it into its own buffer from the
span's reader, lets go of the lock, and verifies (sha256), decompresses and
stores that chunk while the next thread receives the one after. Chunks are
received in file order, so layers complete in execution order; each chunk stays
in one core's cache from socket to store. Nothing unverified is decompressed or
written. The event loop hears of finished chunks through ``on_chunk``, called in
batches (one wake-up per batch, not per chunk).

Costs: one copy of each compressed chunk (connection to buffer), one of each raw
chunk (pwrite into the page cache); one receive buffer and one zstd context per
pool thread; threads = ``threads``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable

import zstandard

from .errors import ChunkIntegrityError, RetryableError, StalledError
from .formats import ChunkEntry, decompress_chunk, verify_chunk
from .schedule import Span
from .stats import DownloadStats
from .transport import SpanReader

ChunkOutcome = Callable[[Span, ChunkEntry, ChunkIntegrityError | None], None]


class ChunkPipeline:
    """Pool threads that turn received chunks into stored ones, for every span of one model."""

    def __init__(
        self,
        *,
        data_offset: int,
        chunk_size_bytes: int,
        write_chunk: Callable[[int, memoryview | bytes], None],
        on_chunk: ChunkOutcome,
        stats: DownloadStats,
        threads: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.data_offset = data_offset
        self.buffer_bytes = chunk_size_bytes + (chunk_size_bytes >> 3)  # compressed chunks can exceed the raw size a little
        self.write_chunk = write_chunk
        self.on_chunk = on_chunk
        self.stats = stats
        self.loop = loop
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streamload-verify")
        self.chunk_spans: dict[int, list[float]] = {}  # index -> [receive start, receive end, verify start, stored] (perf_counter)
        self._local = threading.local()
        self._finished: collections.deque[tuple[Span, ChunkEntry, ChunkIntegrityError | None]] = collections.deque()
        self._drain_scheduled = False

    async def run_span(self, span: Span, reader: SpanReader, threads: int) -> None:
        """Receive, verify, decompress and store a span on ``threads`` pool threads; raises its first failure.

        Returns when no thread touches the span, its reader or the store any more;
        ``span.received`` says how many of its chunks came off the connection.
        """
        span.abort = reader.abort
        count = max(1, min(threads, len(span.chunks)))
        jobs = asyncio.gather(
            *(self.loop.run_in_executor(self.pool, self._pump, span, reader) for _ in range(count)), return_exceptions=True
        )
        try:
            await asyncio.shield(jobs)
        except asyncio.CancelledError:
            span.stop()
            reader.abort()  # a thread blocked on the connection returns at once
            await asyncio.wait([jobs])
            raise
        finally:
            reader.close()
        if span.error is not None:
            raise span.error

    def _pump(self, span: Span, reader: SpanReader) -> None:
        """One pool thread's share of a span: take the next chunk, receive it, let go of the reader, process it."""
        try:
            while True:
                with span.lock:
                    if span.cut or span.received == len(span.chunks):
                        return
                    chunk = span.chunks[span.received]
                    view = self._buffer(chunk.size_bytes)
                    waiting = time.perf_counter()
                    try:
                        reader.read_into(self.data_offset + chunk.offset, view)
                    except (RetryableError, StalledError) as exc:
                        span.stop(exc)
                        return
                    span.received += 1
                received = time.perf_counter()
                self.stats.receive_wait_s += received - waiting
                self.chunk_spans[chunk.index] = [waiting, received, 0.0, 0.0]
                try:
                    self.process(chunk, view)
                except ChunkIntegrityError as exc:
                    self._post(span, chunk, exc)
                    continue
                self._post(span, chunk, None)
        except BaseException as exc:  # a chunk that decodes wrong after its hash matched, a full disk, a bug: fatal
            span.stop(exc)

    def process(self, chunk: ChunkEntry, data: memoryview | bytes) -> None:
        """Verify, decompress and store one chunk (pool thread): nothing unverified is ever decompressed or written."""
        started = time.perf_counter()
        verify_chunk(chunk, data)
        verified = time.perf_counter()
        raw = decompress_chunk(chunk, data, decompressor=self._decompressor())
        decompressed = time.perf_counter()
        self.write_chunk(chunk.raw_offset, raw)
        stored = time.perf_counter()
        self.stats.verify_s += verified - started
        self.stats.decompress_s += decompressed - verified
        self.stats.store_s += stored - decompressed
        span = self.chunk_spans.setdefault(chunk.index, [started, started, 0.0, 0.0])
        span[2], span[3] = started, stored

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
            buffer = self._local.buffer = bytearray(max(size_bytes, self.buffer_bytes))
        return memoryview(buffer)[:size_bytes]

    def _post(self, span: Span, chunk: ChunkEntry, failure: ChunkIntegrityError | None) -> None:
        """Queue a finished chunk for the event loop, waking it only when no wake-up is pending."""
        self._finished.append((span, chunk, failure))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is shutting down
                self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the event loop: report every chunk finished since the last wake-up.

        The flag is cleared before draining, so a chunk queued after the last pop
        schedules its own wake-up; a span's chunks are all drained before the
        thread's job completes (its completion is queued on the loop after them).
        """
        self._drain_scheduled = False
        while self._finished:
            self.on_chunk(*self._finished.popleft())

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
