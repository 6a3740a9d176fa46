"""One download's workers: spans from the scheduler, opened on each live source, through the chunk pipeline.

Every source (the primary URL or file, then each mirror whose header matched) gets its own workers; each takes a
span from the one ``ChunkScheduler``, opens it on its source (the first one goes on reading the header's request,
``bytes=0-``), and runs it through the ``ChunkPipeline``, which yields batches of landed chunks. Those go through
one completion route, ``_chunks_landed``: counted as done in the scheduler, their layers' counts lowered in
``Readiness``, journaled by the ``GroupCommitter``. A chunk that fails its hash is queued again (from another mirror
when one is live) up to MAX_INTEGRITY_ATTEMPTS. Demanded rows are fetched by up to ROW_REQUESTS extra requests
beside the running ones. A source that fails for good is dropped while others remain: what its spans did not
receive goes back to the scheduler for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..cache.journal import GroupCommitter
from ..errors import ChunkIntegrityError, FetchError, FormatError, RetryableError, StalledError, StreamloadError, redact_urls
from ..formats import ChunkEntry, Manifest
from ..formats.chunk_table import ChunkTable, column_at
from ..stats import DownloadStats
from ..transport.httputil import Backoff, RetryPolicy
from ..transport.source import Source, SpanReader
from .mirrors import MAX_BAD_CHUNKS, MIN_WORKERS_PER_MIRROR, HeaderProbes, Mirror, MirrorState, RateMeter, header_mismatch, span_limit_bytes
from .pipeline import ChunkPipeline, Landed
from .readiness import Readiness
from .schedule import ChunkScheduler
from .span import Span

logger = logging.getLogger(__name__)

MAX_INTEGRITY_ATTEMPTS = 3  # fetches of one chunk that fail their hash before giving up
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
    """``connections`` per source; with mirrors at least MIN_WORKERS_PER_MIRROR each (no idle link between spans)."""
    return connections if not mirrored else max(MIN_WORKERS_PER_MIRROR, connections)


class Download:
    """The workers and sources of one model's download; ``start`` runs them until the scheduler is finished."""

    def __init__(
        self,
        *,
        url: str,
        source: Source,
        manifest: Manifest,
        data_offset: int,
        table: ChunkTable,
        scheduler: ChunkScheduler,
        pipeline: ChunkPipeline,
        committer: GroupCommitter,
        readiness: Readiness,
        stats: DownloadStats,
        retry: RetryPolicy,
        connections: int,
        verify_threads: int,
        mirror_urls: list[str],
        probes: HeaderProbes,
        header_stream: SpanReader | None,
    ) -> None:
        self.url = url
        self.source = source  # the primary's (the origin closes it)
        self.manifest = manifest
        self.data_offset = data_offset
        self.table = table
        self.scheduler = scheduler
        self.pipeline = pipeline
        self.committer = committer
        self.readiness = readiness
        self.stats = stats
        self.retry = retry
        self.connections = connections
        self.verify_threads = verify_threads
        self.mirror_urls = mirror_urls
        self.probes = probes
        self.header_stream = header_stream  # the header's request, going on into the data
        self.mirrors: list[Mirror] = []  # the primary URL's, then each mirror's (made when the download starts)
        self._task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None  # the running download's, for extra row requests
        self._row_requests = 0  # extra requests running for demanded rows
        self._integrity_attempts: dict[int, int] = {}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Fetch what the scheduler has pending from the primary source and the mirrors (once; again after damaged
        cached chunks were reopened)."""
        if self.running:
            return
        if not self.mirrors:  # the primary first: its header is the model's; the others are probed against it
            self.mirrors = [Mirror(self.url, self.source, MirrorState.LIVE)] + [Mirror(url) for url in self.mirror_urls]
        self._task = asyncio.create_task(self._run(), name=f"streamload download {self.manifest.digest[:12]}")

    async def _run(self) -> None:
        try:
            while True:  # again when chunks were reopened (damaged in the cache) while the last commits ran
                await self._serve_until_finished()
                self.readiness.finish()  # every layer is usable now; durability follows, before close() returns
                await self.committer.flush()
                if self.scheduler.finished:
                    await self.committer.mark_complete()
                    if self.scheduler.finished:  # no await between this test and the task's end: nothing is missed
                        break
        except BaseException as exc:  # delivered to every waiter; close() awaits this task
            failure = first_cause(exc)
            if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                self.readiness.fail(asyncio.CancelledError("the download was cancelled"))
                raise
            if self.readiness.complete.done():  # the data is all here and usable; only its bookkeeping failed
                logger.warning(
                    "the model is complete but could not be recorded in the cache (%s); it will be checked again next time", failure
                )
            self.readiness.fail(failure)

    async def _serve_until_finished(self) -> None:
        """Every usable source's workers (and the row requests), until the scheduler has nothing left."""
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                watcher = tasks.create_task(self.committer.watch())
                if self.readiness.chunk_waiters:
                    self.start_row_requests()  # rows were demanded before this download started
                serving = [tasks.create_task(self._serve(mirror)) for mirror in self.mirrors if mirror.usable]
                while not self.scheduler.finished:  # a source that fails for good raises when no other is left
                    await self.scheduler.wait_for_change()
                watcher.cancel()
                for task in serving:  # a mirror still being probed, or workers waiting out a backoff
                    task.cancel()
        finally:
            self._tasks = None

    async def _serve(self, mirror: Mirror) -> None:
        """One source's workers, after (for a mirror) its header matched the model's."""
        assert self._tasks is not None
        if mirror.state is MirrorState.PROBING and not await self._probe(mirror):
            return
        assert mirror.source is not None
        if self._ignores_range(mirror):
            return
        workers = (
            1 if not mirror.source.remote or mirror.source.whole_file_only else workers_per_source(self.connections, bool(self.mirror_urls))
        )
        threads = -(-self.verify_threads // (workers * len(self.mirrors)))
        await asyncio.gather(*(self._tasks.create_task(self._worker(mirror, threads)) for _ in range(workers)))

    async def _probe(self, mirror: Mirror) -> bool:
        """Check a mirror's header against the model's; True when it serves the same model.
        Otherwise it is dropped, named in the log."""
        source, task = self.probes.take(mirror.url)
        try:
            header = await task
            problem = header_mismatch(header, self.manifest.digest, self.data_offset)
        except (FetchError, FormatError) as exc:
            header, problem = None, f"its header cannot be read ({exc})"
        except asyncio.CancelledError:  # the download ended first: the probe goes with it (a restart probes again)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await task
            await source.close()
            raise
        if problem is not None or header is None:
            await source.close()
            self._drop(mirror, problem or "no header")
            return False
        mirror.source, mirror.state = source, MirrorState.LIVE
        self.scheduler.notify()  # chunks others served corrupt, left for it, may be taken now
        self._count_bytes(mirror, len(header.raw))
        logger.info(
            "mirror %s serves the same model %s: it takes a share of the download", redact_urls(mirror.url), self.manifest.digest[:12]
        )
        return True

    def _ignores_range(self, mirror: Mirror) -> bool:
        """True (and the source dropped) when it answers with the whole file while another live source honours Range:
        it could only read the model from byte 0, alone."""
        assert mirror.source is not None
        if not mirror.source.whole_file_only or not any(m is not mirror and m.state is MirrorState.LIVE for m in self.mirrors):
            return False
        self._drop(mirror, "it ignores Range (answers 200 with the whole file), so it cannot share the download")
        return True

    def _drop(self, mirror: Mirror, reason: str) -> None:
        """Use this source no more: its running spans end at their next chunk boundary and give the rest back.

        Raises FetchError when no source is left (none live, none being probed).
        """
        if mirror.state is MirrorState.DROPPED:
            return
        mirror.state, mirror.reason = MirrorState.DROPPED, reason
        for span in mirror.spans:
            span.stop()
        self.scheduler.notify()  # chunks left for it (others served them corrupt) may go to anyone now
        if not any(m.usable for m in self.mirrors):
            sources = "; ".join(f"{m.url}: {m.reason}" for m in self.mirrors)
            raise FetchError(f"every source of {self.manifest.digest[:12]} failed ({sources}); connect and run again")
        logger.warning("%s: %s; the other sources take its share", redact_urls(mirror.url), reason)

    def _count_bytes(self, mirror: Mirror, size_bytes: int) -> None:
        self.stats.bytes_downloaded += size_bytes
        by_source = self.stats.bytes_by_source
        by_source[mirror.url] = by_source.get(mirror.url, 0) + size_bytes

    def _span_limit_bytes(self, meter: RateMeter | None) -> int:
        if meter is not None and sum(m.usable for m in self.mirrors) > 1:  # spans by rate while others share (or may)
            live = [m for mirror in self.mirrors if mirror.state is MirrorState.LIVE for m in mirror.meters]
            return span_limit_bytes(meter, live, self.scheduler.pending_bytes, self.manifest.chunk_size_bytes)
        if self.connections == 1:
            return 1 << 62  # one request for the whole contiguous run; cut short only to jump the queue
        return max(self.manifest.chunk_size_bytes, min(64 << 20, self.readiness.bytes_to_download // (4 * self.connections)))

    def _avoid(self, mirror: Mirror) -> frozenset[int]:
        """Positions of chunks this mirror served corrupt, while another mirror (live or being probed) has not."""
        if not mirror.bad_chunks:
            return frozenset()
        return frozenset(
            self.scheduler.position_of(chunk)
            for index, chunk in mirror.bad_chunks.items()
            if any(m.usable and index not in m.bad_chunks for m in self.mirrors)
        )

    def start_row_requests(self) -> None:
        """Extra requests for demanded rows, beside the running ones (none for a server that ignores Range)."""
        mirror = next((m for m in self.mirrors if m.state is MirrorState.LIVE), None)
        if self._tasks is None or mirror is None or mirror.source is None or mirror.source.whole_file_only:
            return  # no download running: what is demanded is here, or is fetched when it starts
        while self._row_requests < ROW_REQUESTS:
            try:
                self._tasks.create_task(self._worker(mirror, self.verify_threads, rows_only=True))
            except RuntimeError:  # the task group has finished: everything is here
                return
            self._row_requests += 1

    def _take_span(self, source: Source, meter: RateMeter | None, avoid: frozenset[int], *, rows_only: bool) -> Span | None:
        """What a worker fetches next on a new request: demanded rows only (an extra request), the whole file (a
        server that ignores Range), or the scheduler's next span."""
        if rows_only:
            return self.scheduler.take_urgent_span(self.manifest.chunk_size_bytes * 4, MAX_GAP_BYTES, avoid)
        if source.whole_file_only:
            return self.scheduler.take_all()
        return self.scheduler.take_span(self._span_limit_bytes(meter), MAX_GAP_BYTES, avoid)

    async def _worker(self, mirror: Mirror, threads: int, *, rows_only: bool = False) -> None:
        """Take a span, open it on the mirror's source (or go on reading the open body), run it through the pipeline;
        retry what did not arrive. ``rows_only``: an extra request for demanded rows, ending when none are pending.
        A source that fails for good is dropped while others remain: what its spans did not receive goes to them."""
        source = mirror.source
        assert source is not None
        backoff = Backoff(self.retry, f"downloading {mirror.url}")
        meter = None if rows_only else RateMeter()
        if meter is not None:
            mirror.meters.append(meter)
        body: SpanReader | None = None  # an open-ended body this worker may go on reading
        try:
            while not self.scheduler.finished and mirror.state is MirrorState.LIVE and not self._ignores_range(mirror):
                span = None
                avoid = self._avoid(mirror)
                if body is None and not rows_only and self.header_stream is not None and mirror is self.mirrors[0]:
                    body, self.header_stream = self.header_stream, None
                if body is not None and not body.whole_file:  # go on with the open body while the chunks there are pending
                    span = self.scheduler.take_span_at(
                        body.position - self.data_offset, self._span_limit_bytes(meter), MAX_GAP_BYTES, REUSE_SKIP_BYTES, avoid
                    )
                    if span is None:
                        body.close()
                        body = None
                if span is None:
                    span = self._take_span(source, meter, avoid, rows_only=rows_only)
                if span is None:
                    if rows_only:
                        return  # no demanded rows left to fetch
                    await self.scheduler.wait_for_change()
                    continue
                mirror.spans.add(span)
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
                            self._chunks_landed(span, landed, mirror)
                    if (open_ended or reader.whole_file) and span.error is None:
                        body, reader = reader, None  # at a chunk boundary, going on to the end of the file: the next span may continue it
                    backoff.failures = 0
                except (RetryableError, StalledError) as exc:
                    failure = exc
                except FetchError as exc:  # an answer no retry mends (a 404, a malformed header): the others go on without it
                    if len(self.mirrors) == 1:
                        raise
                    self._drop(mirror, str(exc))
                    return
                finally:
                    if reader is not None:
                        reader.close()
                    mirror.spans.discard(span)
                    if meter is not None:
                        meter.record(span.received_bytes(), time.perf_counter() - opened)
                    self.scheduler.finish_span(span)  # before any backoff: what did not arrive is for the others now
                    if self.readiness.chunk_waiters and self.scheduler.urgent_waiting():
                        self.start_row_requests()  # demanded rows given back by a cut span: fetch them beside it
                if failure is not None:
                    self.stats.retries += 1
                    if meter is not None:
                        meter.rate_bytes_per_s = None  # measured again from one chunk when it works again
                    try:
                        await backoff.wait(failure, progressed=span.received > 0)  # chunks that did arrive count as progress
                    except FetchError as gave_up:
                        if len(self.mirrors) == 1:
                            raise
                        self._drop(mirror, str(gave_up))
                        return
        finally:
            if body is not None:
                body.close()
            if meter is not None:
                mirror.meters.remove(meter)
            if rows_only:
                self._row_requests -= 1

    def _chunks_landed(self, span: Span, landed: Landed, mirror: Mirror) -> None:
        """For every chunk of every source, as it lands: journal it and signal its layer, or handle its failure."""
        assert mirror.source is not None
        stored, table = landed.stored, self.table
        if mirror.source.remote:
            self._count_bytes(mirror, landed.size_bytes)
        for position, failure in landed.failed:
            fatal = self._integrity_failed(table.entry(position), failure, mirror)
            if fatal is not None:
                span.stop(fatal)
        self.scheduler.done(stored)
        indices = column_at(table.index, stored)
        self.readiness.landed(column_at(table.layer, stored), column_at(table.pass_index, stored), indices)
        self.stats.chunks_fetched += len(stored)
        self.committer.add_columns(indices, landed.digests)
        if self.scheduler.finished:
            self.readiness.finish()  # now, not when a group commit still running ends
        else:
            self.readiness.report_progress()

    def _integrity_failed(self, chunk: ChunkEntry, exc: ChunkIntegrityError, mirror: Mirror) -> ChunkIntegrityError | None:
        """A chunk failed its hash: queue it again (for another mirror when one is live), or (too many attempts with no
        other mirror left to try, or a local file) the error that ends the download. A mirror that keeps serving
        corrupt chunks is dropped while another is live."""
        assert mirror.source is not None
        self.stats.integrity_failures += 1
        attempts = self._integrity_attempts.get(chunk.index, 0) + 1
        self._integrity_attempts[chunk.index] = attempts
        mirror.bad_chunks[chunk.index] = chunk
        remote = mirror.source.remote
        untried = [m for m in self.mirrors if m.usable and chunk.index not in m.bad_chunks]  # a mirror being probed counts
        if not remote or (attempts >= MAX_INTEGRITY_ATTEMPTS and not untried):
            culprits = ", ".join(m.url for m in self.mirrors if chunk.index in m.bad_chunks)
            where = "the file" if not remote else f"{attempts} downloads from {culprits}"
            fatal = ChunkIntegrityError(
                f"chunk {chunk.index} of layer {chunk.layer_index} failed its sha256 check in {where}; "
                "the source is corrupt: nothing from it was used. Re-convert or re-upload the model.",
                layer_index=chunk.layer_index,
                chunk_index=chunk.index,
            )
            fatal.__cause__ = exc
            return fatal
        if untried:
            others = redact_urls(" or ".join(m.url for m in untried))
            logger.warning("%s (from %s); fetching it from %s", exc, redact_urls(mirror.url), others)
        else:
            logger.warning("%s; fetching it again", exc)
        self.scheduler.give_back([self.scheduler.position_of(chunk)])
        others = [m for m in self.mirrors if m is not mirror and m.state is MirrorState.LIVE]
        if len(mirror.bad_chunks) >= MAX_BAD_CHUNKS and others:
            self._drop(mirror, f"{len(mirror.bad_chunks)} chunks from it failed their sha256 check")
        return None

    async def stop(self) -> None:
        """Stop (an unfinished download) or let the last group commit end; close the body no worker took."""
        if self._task is not None:
            if not self.readiness.complete.done() or self.readiness.complete.exception() is not None:
                self._task.cancel()  # unfinished: stop; what is committed stays for the next run
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await self._task  # finished: the last group commit completes first
        if self.header_stream is not None:  # no worker took it (the download failed first)
            self.header_stream.close()
            self.header_stream = None

    async def close_sources(self) -> None:
        """Close every mirror's source (the primary's is the origin's), once the pipeline's threads are done."""
        for mirror in self.mirrors:
            if mirror.source is not None and mirror.source is not self.source:
                await mirror.source.close()
