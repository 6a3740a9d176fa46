"""One download's workers: spans from the scheduler, opened on each live source, through the chunk pipeline.

Every source (``Sources``: the primary URL or file, then each mirror whose header matched) gets its own workers; each
takes a span from the download's ``ChunkScheduler``, opens it on its source (the first one goes on reading the
header's request, ``bytes=0-``), and runs it through the ``ChunkPipeline``, which yields batches of landed chunks.
Those are put on the download's ``Handover`` (its one completion route drains it). A chunk that fails its hash is queued again
(from another mirror when one is live) up to MAX_INTEGRITY_ATTEMPTS. Demanded rows are fetched by up to
ROW_REQUESTS extra requests beside the running ones. A source that fails for good is dropped while others remain:
what its spans did not receive goes back to the scheduler for them. Event loop only; the pipeline's threads do the
per-byte work.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import ChunkIntegrityError, FetchError, RetryableError, StalledError, StreamloadError
from ..formats import ChunkEntry, Manifest
from ..stats import DownloadStats
from ..transport.httputil import Backoff
from ..transport.source import SpanReader
from .hosts import MIN_WORKERS_PER_HOST, Host, HostState, RateMeter, span_limit_bytes
from .landed import Handed, Handover, Landed
from .pipeline import ChunkPipeline
from .schedule import ChunkScheduler
from .sources import Sources
from .span import Span

if TYPE_CHECKING:
    from .model_download import DownloadSettings

ROW_REQUESTS = 4  # extra parallel requests for demanded rows, beside the running ones
MAX_GAP_BYTES = 64 << 10  # a span reads over this much it does not need rather than make another request
REUSE_SKIP_BYTES = 256 << 10  # an open body goes on to the next span when that starts at most this far ahead


def first_cause(exc: BaseException) -> BaseException:
    """The error to show for a failed task group: its first StreamloadError, else its first error."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    return next((e for e in leaves if isinstance(e, StreamloadError)), leaves[0] if leaves else exc)


def workers_per_source(connections: int, mirrored: bool) -> int:
    """``connections`` per source; with mirrors at least MIN_WORKERS_PER_HOST each (no idle link between spans)."""
    return connections if not mirrored else max(MIN_WORKERS_PER_HOST, connections)


class Workers:
    """The workers of one download's sources; ``serve`` runs them until the scheduler is finished."""

    def __init__(
        self,
        settings: DownloadSettings,
        *,
        manifest: Manifest,
        data_offset: int,
        stats: DownloadStats,
        scheduler: ChunkScheduler,
        pipeline: ChunkPipeline,
        sources: Sources,
        header_stream: SpanReader | None,
        handover: Handover,
        bytes_to_download: int,
        rows_awaited: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.data_offset = data_offset
        self.stats = stats
        self.handover = handover  # the download's: landed batches go there, and it lands them
        self.bytes_to_download = bytes_to_download  # what the cache lacked when the model was opened: spans' size
        self.rows_awaited = rows_awaited  # the download's readiness, asked whether a caller waits for rows
        self.scheduler = scheduler  # the download's: spans are taken from it, and given back
        self.pipeline = pipeline
        self.sources = sources
        self.header_stream = header_stream  # the header's request, going on into the data
        self._tasks: asyncio.TaskGroup | None = None  # the running download's, for extra row requests
        self._row_requests = 0  # extra requests running for demanded rows

    async def serve(self, *beside: Coroutine[Any, Any, None]) -> None:
        """Every usable source's workers (and the row requests, and the ``beside`` coroutines, cancelled at the end),
        until the scheduler has nothing left."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                watchers = [tasks.create_task(coroutine) for coroutine in beside]
                if self.rows_awaited():
                    self.start_row_requests()  # rows were demanded before this download started
                serving = [tasks.create_task(self._serve(host)) for host in self.sources.hosts if host.usable]
                while not self.scheduler.finished:  # a source that fails for good raises when no other is left
                    await self.scheduler.wait_for_change()
                for task in (*watchers, *serving):  # a mirror still being probed, or workers waiting out a backoff
                    task.cancel()
        finally:
            self._tasks = None

    def close(self) -> None:
        """Close the header's request if no worker took it (the download failed first)."""
        if self.header_stream is not None:
            self.header_stream.close()
            self.header_stream = None

    def _chunks_landed(self, span: Span, landed: Landed, host: Host) -> None:
        """For every chunk of every source, as it lands: handed to the download, or its failure handled."""
        assert host.source is not None
        stored, table = landed.stored, self.scheduler.table
        if host.source.remote:
            self.sources.count_bytes(host, landed.size_bytes)
        for position, failure in landed.failed:
            fatal = self._integrity_failed(table.entry(position), failure, host)
            if fatal is not None:
                span.stop(fatal)
        self.handover.put(Handed(stored, landed.digests, fetched=landed))

    def _integrity_failed(self, chunk: ChunkEntry, exc: ChunkIntegrityError, host: Host) -> ChunkIntegrityError | None:
        """A chunk failed its hash: queue it again (for another mirror when one is live), or the error that ends the
        download. A mirror that keeps serving corrupt chunks is dropped while another is live."""
        fatal = self.sources.judge_integrity(chunk, exc, host)
        if fatal is not None:
            return fatal
        self.scheduler.give_back([self.scheduler.position_of(chunk)])
        if self.sources.too_corrupt(host):
            self._drop(host, f"{len(host.bad_chunks)} chunks from it failed their sha256 check")
        return None

    async def _serve(self, host: Host) -> None:
        """One source's workers, after (for a mirror) its header matched the model's."""
        assert self._tasks is not None
        if host.state is HostState.PROBING:
            probed = await self.sources.probe(host, self.manifest.digest, self.data_offset)
            self.scheduler.notify()  # chunks others served corrupt, left for it, may be taken now (or by anyone)
            if not probed:
                return
        assert host.source is not None
        if self._ignores_range(host):
            return
        settings = self.settings
        remote = host.source.remote and not host.source.whole_file_only
        workers = workers_per_source(settings.connections, bool(settings.mirror_urls)) if remote else 1
        threads = -(-settings.verify_threads // (workers * len(self.sources.hosts)))
        await asyncio.gather(*(self._tasks.create_task(self._worker(host, threads)) for _ in range(workers)))

    def _ignores_range(self, host: Host) -> bool:
        """True (and the source dropped) when it answers with the whole file while another live source honours Range."""
        if not self.sources.ignores_range(host):
            return False
        self._drop(host, "it ignores Range (answers 200 with the whole file), so it cannot share the download")
        return True

    def _drop(self, host: Host, reason: str) -> None:
        """Use this source no more (FetchError when none is left); chunks left for it may go to anyone now."""
        try:
            self.sources.drop(host, reason, self.manifest.digest)
        finally:
            self.scheduler.notify()

    def _span_limit_bytes(self, meter: RateMeter | None) -> int:
        hosts, connections = self.sources.hosts, self.settings.connections
        if meter is not None and sum(m.usable for m in hosts) > 1:  # spans by rate while others share (or may)
            live = [m for host in hosts if host.state is HostState.LIVE for m in host.meters]
            return span_limit_bytes(meter, live, self.scheduler.pending_bytes, self.manifest.chunk_size_bytes)
        if connections == 1:
            return 1 << 62  # one request for the whole contiguous run; cut short only to jump the queue
        return max(self.manifest.chunk_size_bytes, min(64 << 20, self.bytes_to_download // (4 * connections)))

    def _avoid(self, host: Host) -> frozenset[int]:
        """Positions of chunks this mirror served corrupt, while another mirror (live or being probed) has not."""
        if not host.bad_chunks:
            return frozenset()
        return frozenset(
            self.scheduler.position_of(chunk)
            for index, chunk in host.bad_chunks.items()
            if any(m.usable and index not in m.bad_chunks for m in self.sources.hosts)
        )

    def start_row_requests(self) -> None:
        """Extra requests for demanded rows, beside the running ones (none for a server that ignores Range)."""
        host = self.sources.first_live()
        if self._tasks is None or host is None or host.source is None or host.source.whole_file_only:
            return  # no download running: what is demanded is here, or is fetched when it starts
        while self._row_requests < ROW_REQUESTS:
            try:
                self._tasks.create_task(self._worker(host, self.settings.verify_threads, rows_only=True))
            except RuntimeError:  # the task group has finished: everything is here
                return
            self._row_requests += 1

    def _next_span(
        self, host: Host, meter: RateMeter | None, body: SpanReader | None, *, rows_only: bool
    ) -> tuple[Span | None, SpanReader | None]:
        """What a worker fetches next, and the open body it goes on reading for it (None: a new request): demanded rows
        only (an extra request), the rest of an open body while the chunks there are pending, the whole file (a server
        that ignores Range), or the scheduler's next span."""
        assert host.source is not None
        avoid = self._avoid(host)
        if body is None and not rows_only and self.header_stream is not None and host is self.sources.hosts[0]:
            body, self.header_stream = self.header_stream, None
        if body is not None and not body.whole_file:
            span = self.scheduler.take_span_at(
                body.position - self.data_offset, self._span_limit_bytes(meter), MAX_GAP_BYTES, REUSE_SKIP_BYTES, avoid
            )
            if span is not None:
                return span, body
            body.close()
            body = None
        if rows_only:
            return self.scheduler.take_urgent_span(self.manifest.chunk_size_bytes * 4, MAX_GAP_BYTES, avoid), body
        if host.source.whole_file_only:
            return self.scheduler.take_all(), body
        return self.scheduler.take_span(self._span_limit_bytes(meter), MAX_GAP_BYTES, avoid), body

    async def _worker(self, host: Host, threads: int, *, rows_only: bool = False) -> None:
        """Take a span, open it on the mirror's source (or go on reading the open body), run it through the pipeline;
        retry what did not arrive. ``rows_only``: an extra request for demanded rows, ending when none are pending.
        A source that fails for good is dropped while others remain: what its spans did not receive goes to them."""
        source = host.source
        assert source is not None
        backoff = Backoff(self.settings.retry, f"downloading {host.url}")
        meter = None if rows_only else RateMeter()
        if meter is not None:
            host.meters.append(meter)
        body: SpanReader | None = None  # an open-ended body this worker may go on reading
        try:
            while not self.scheduler.finished and host.state is HostState.LIVE and not self._ignores_range(host):
                span, body = self._next_span(host, meter, body, rows_only=rows_only)
                if span is None:
                    if rows_only:
                        return  # no demanded rows left to fetch
                    await self.scheduler.wait_for_change()
                    continue
                host.spans.add(span)
                start, end = self.data_offset + span.start, self.data_offset + span.end
                reader: SpanReader | None = None
                failure: RetryableError | StalledError | None = None
                opened = time.perf_counter()
                try:
                    open_ended = body is not None  # the header's request (bytes=0-) or what went on from it
                    reader = body or await source.open_span(start, end)
                    body = None
                    if reader.whole_file:
                        span.cuttable = False
                    async with contextlib.aclosing(self.pipeline.run_span(span, reader, threads)) as outcomes:
                        async for landed in outcomes:
                            self._chunks_landed(span, landed, host)
                    if (open_ended or reader.whole_file) and span.error is None:
                        body, reader = reader, None  # at a chunk boundary, going on to the end of the file: the next span may continue it
                    backoff.failures = 0
                except (RetryableError, StalledError) as exc:
                    failure = exc
                except FetchError as exc:  # an answer no retry mends (a 404, a malformed header): the others go on without it
                    if len(self.sources.hosts) == 1:
                        raise
                    self._drop(host, str(exc))
                    return
                finally:
                    if reader is not None:
                        reader.close()
                    host.spans.discard(span)
                    if meter is not None:
                        meter.record(span.received_bytes(), time.perf_counter() - opened)
                    self.scheduler.finish_span(span)  # before any backoff: what did not arrive is for the others now
                    if self.rows_awaited() and self.scheduler.urgent_waiting():
                        self.start_row_requests()  # demanded rows given back by a cut span: fetch them beside it
                if failure is not None:
                    self.stats.retries += 1
                    if meter is not None:
                        meter.rate_bytes_per_s = None  # measured again from one chunk when it works again
                    try:
                        await backoff.wait(failure, progressed=span.received > 0)  # chunks that did arrive count as progress
                    except FetchError as gave_up:
                        if len(self.sources.hosts) == 1:
                            raise
                        self._drop(host, str(gave_up))
                        return
        finally:
            if body is not None:
                body.close()
            if meter is not None:
                host.meters.remove(meter)
            if rows_only:
                self._row_requests -= 1
