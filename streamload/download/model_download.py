"""One model's download: the one owner of its scheduler, readiness, pipeline, committer, workers and delta stream.

The session asks it, and nothing else, for what the cache lacks: a layer (``wait_for_layer``: fetched first when it
is not here), chunks of rows (``wait_for_chunks``: on extra requests beside the running one), damaged cached chunks
fetched again (``reopen``). The ``Workers`` take spans from its ``ChunkScheduler`` and run them through its
``ChunkPipeline``; what they land, and what the ``DeltaStream`` rebuilds or gives back, they put on its ``Handover``
(nothing calls back up), which it drains through one completion route, ``land``: done in the scheduler, the layers'
counts lowered in ``Readiness``, journaled by the ``GroupCommitter``. Event loop only: a few numpy passes over the chunk table when it
is made; per landed batch, column work and no object per chunk; the pipeline's threads do the per-byte work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..cache.model_cache import ModelCache
from ..errors import FetchError, StreamloadError
from ..formats import ChunkEntry, Manifest
from ..formats.chunk_table import column_at
from ..stats import DownloadStats, Progress
from ..transport.httputil import RetryPolicy
from ..transport.source import Source, SpanReader
from .chunk_index import ChunkIndex
from .probes import HeaderProbes
from .readiness import Readiness

if TYPE_CHECKING:
    from ..cache.journal import GroupCommitter
    from .delta_stream import DeltaStream
    from .landed import Handed, Handover
    from .pipeline import ChunkPipeline
    from .schedule import ChunkScheduler
    from .sources import Sources
    from .workers import Workers

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class DownloadSettings:
    """How one model is fetched: from where, over how many connections, on how many threads."""

    url: str  # the primary URL or file
    mirror_urls: list[str]  # other hosts of the same file, checked by manifest digest before use
    retry: RetryPolicy
    connections: int  # per source
    verify_threads: int  # pool threads that verify, decompress and store


def default_verify_threads() -> int:
    """Cores + 1, at most 8: one thread waits on the connection while the others compute."""
    return min(8, (os.cpu_count() or 1) + 1)


class Download:
    """What one model still lacks and what is ready; ``start`` runs the workers until nothing is pending."""

    def __init__(
        self,
        settings: DownloadSettings,
        *,
        manifest: Manifest,
        data_offset: int,
        index: ChunkIndex,
        cache: ModelCache,
        pending: np.ndarray,
        stats: DownloadStats,
        probes: HeaderProbes,
        progress: Callable[[Progress], None] | None,
        started: float,
        header_stream: SpanReader | None,
        delta: DeltaStream | None,
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.data_offset = data_offset
        self.index = index
        self.table = table = index.table
        self.cache = cache
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.done_at_open = ~pending  # positions the cache held; the scheduler starts from them
        self._scheduler: ChunkScheduler | None = None  # made when first asked for: a model the cache holds whole needs none
        pending_bytes = int(table.size[pending].sum())
        layer_count = len(manifest.layers)
        # chunks of each layer not yet stored, refinements included; pass-0 chunks only
        self.readiness = Readiness(
            self.loop,
            remaining=np.bincount(table.layer[pending], minlength=layer_count).tolist(),
            remaining_coarse=np.bincount(table.layer[pending & (table.pass_index == 0)], minlength=layer_count).tolist(),
            started=started,
            stats=stats,
            progress=progress,
            bytes_to_download=pending_bytes,
            bytes_cached=int(table.size.sum()) - pending_bytes,
        )
        self.probes = probes  # the mirrors' headers, which the sources take when the download first starts
        self.sources: Sources | None = None  # made when the download first starts
        self.pipeline: ChunkPipeline | None = None  # and so is this
        self.committer: GroupCommitter | None = None  # and this
        self.workers: Workers | None = None  # and these
        self.delta = delta  # chunks rebuilt from a delta file beside the download (given back if they fail)
        # what the workers and the delta stream hand over, drained by ``_take_handed``: made with the first of them
        self.handover: Handover | None = None
        if delta is not None:
            self.scheduler.take_positions(delta.positions.tolist())
        self.header_stream = header_stream  # the header's request, going on into the data (the first worker takes it)
        self.offline: FetchError | None = None  # no source could be reached: the cache's chunks are all there is
        self._task: asyncio.Task[None] | None = None

    @property
    def scheduler(self) -> ChunkScheduler:
        """Which chunks next, made when first asked for (from what the cache held at open): a model the cache holds
        whole never fetches, and its cold start skips the scheduler's modules."""
        if self._scheduler is None:
            from .schedule import ChunkScheduler

            table, index = self.table, self.index
            self._scheduler = ChunkScheduler(
                table, table.index[self.done_at_open].tolist(), rows_from=index.rows_from, requires=index.plan.requires
            )
        return self._scheduler

    def done_mask(self) -> np.ndarray:
        """Per position, whether the chunk is stored (what the cache held at open, while nothing was scheduled)."""
        return self.done_at_open if self._scheduler is None else self._scheduler.done_mask()

    def _open_handover(self) -> Handover:
        if self.handover is None:
            from .landed import Handover

            self.handover = Handover()
        return self.handover

    # ------------------------------------------------------------ what the session asks

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def complete(self) -> asyncio.Future[None]:
        return self.readiness.complete

    @property
    def ready_s(self) -> list[float | None]:
        return self.readiness.ready_s

    @property
    def coarse_ready_s(self) -> list[float | None]:
        return self.readiness.coarse_ready_s

    @property
    def bytes_to_download(self) -> int:
        """Compressed bytes the cache lacked when the model was opened."""
        return self.readiness.bytes_to_download

    def chunk_times(self) -> dict[int, tuple[float, float, float, float]]:
        """Chunk index -> (receive start, receive end, verify start, stored) (perf_counter) of the chunks fetched so far."""
        return self.pipeline.chunk_times if self.pipeline is not None else {}

    async def wait_for_layer(self, index: int, *, coarse: bool = False) -> None:
        """Layer ``index`` (``coarse``: its pass-0 chunks) is stored: fetched first when it is not yet."""
        ready = self.readiness.coarse_ready if coarse else self.readiness.ready
        if not ready[index].done():
            self.scheduler.prioritize(index, coarse=coarse)
        await asyncio.shield(ready[index])

    async def wait_for_chunks(self, positions: np.ndarray) -> None:
        """These chunks (positions, ascending) are stored: demanded without cutting the running request, on extra
        requests beside it (and on the delta file's, for what it holds)."""
        missing = positions[~self.done_mask()[positions]]
        if len(missing) and self.offline is not None:
            table = self.table
            raise FetchError(
                f"the input's rows need {len(missing)} chunks ({int(table.size[missing].sum())} bytes) of layer "
                f"{int(table.layer[missing[0]])} that are not in the cache, and {self.settings.url} cannot be reached "
                f"({self.offline}); a connection would fetch them"
            )
        if len(missing):
            waiters = self.readiness.wait_for_chunks(self.table.index[missing].tolist())
            self.scheduler.demand(missing.tolist(), cut=False)
            if self.delta is not None:  # rows the delta file holds: on an extra request to it
                self.delta.demand(self.table.index[missing].tolist())
            if self.workers is not None:
                self.workers.start_row_requests()
            await asyncio.gather(*(asyncio.shield(w) for w in waiters))

    def reopen(self, chunks: Sequence[ChunkEntry]) -> list[int]:
        """Chunks counted as stored are missing again (damaged in the cache): pending in the scheduler, their layers
        waiting again. Returns the layers concerned."""
        layers = self.readiness.reopen(chunks)
        self.scheduler.reopen([self.scheduler.position_of(c) for c in chunks])
        return layers

    def fail_layers(self, layers: Sequence[int], failure: BaseException) -> None:
        self.readiness.fail_layers(layers, failure)

    def what_is_missing(self, store_cut_short: bool) -> str:
        """Which bytes the cache lacks, in words, for an error when no source can be had for them."""
        first = self.table.entry(self.scheduler.first_not_done() or 0)
        layer = f"layer {first.layer_index} ({self.manifest.layers[first.layer_index].name})"
        if store_cut_short:
            return f"{layer} of the cached model {self.manifest.digest[:12]} is damaged (its store was cut short)"
        return f"the cached copy of {self.manifest.digest[:12]} lacks {self.scheduler.pending_bytes} bytes from {layer} on"

    def fail_missing(self, offline: FetchError) -> None:
        """No server: each layer the cache lacks fails with what it lacks and how much; rows fail as they are asked for
        (``wait_for_chunks``); the layers and rows the cache holds are used."""
        self.offline = offline
        table, readiness = self.table, self.readiness
        pending = ~self.done_mask()
        lacking = np.bincount(table.layer[pending], weights=table.size[pending], minlength=len(self.manifest.layers))
        why = f"{self.settings.url} cannot be reached ({offline}); a connection would fetch them"
        for index in np.flatnonzero(lacking).tolist():
            name = self.manifest.layers[index].name
            failure = FetchError(f"layer {index} ({name}) is not in the cache: {int(lacking[index])} bytes missing, and {why}")
            readiness.fail_layers([index], failure, coarse=True)
        lacks = f"lacks {self.scheduler.pending_bytes} bytes of {self.stats.bytes_total}"
        readiness.fail_complete(FetchError(f"the cache of {self.manifest.digest[:12]} {lacks}, and {why}"))

    async def finish_cached(self) -> None:
        """Nothing is pending: the cache held it all (recorded as complete, once)."""
        if not self.cache.is_complete():
            await asyncio.to_thread(self.cache.mark_complete)
        self.readiness.finish()

    # ------------------------------------------------------------ the completion route

    def land(self, positions: Sequence[int], layers: np.ndarray, passes: np.ndarray, indices: np.ndarray, digests: Sequence[int]) -> None:
        """Chunks are stored: done in the scheduler, their layers' counts lowered, journaled with the next group."""
        assert self.committer is not None
        self.scheduler.done(positions)
        self.readiness.landed(layers, passes, indices)
        self.committer.add_columns(indices, digests)
        if self.scheduler.finished:
            self.readiness.finish()  # now, not when a group commit still running ends
        else:
            self.readiness.report_progress()

    def _take_handed(self, handed: Handed) -> None:
        """One batch the workers or the delta stream handed over: fetched chunks (their pool thread's seconds added to
        the stats, which pool threads never write), rebuilt ones (what their frames saved counts as cached for the
        progress reports), or chunks the delta file could not give (fetched whole)."""
        table, stats, positions = self.table, self.stats, handed.positions
        if handed.given_back:
            self.scheduler.give_back(positions)
            return
        fetched = handed.fetched
        if fetched is not None:
            stats.chunks_fetched += len(positions)
            stats.receive_wait_s += fetched.receive_wait_s
            stats.verify_s += fetched.verify_s
            stats.decompress_s += fetched.decompress_s
            stats.store_s += fetched.store_s
        else:
            self.readiness.count_rebuilt(int(column_at(table.size, positions).sum()) - handed.saved_bytes)
            stats.chunks_delta += len(positions)
        layers, passes = column_at(table.layer, positions), column_at(table.pass_index, positions)
        self.land(positions, layers, passes, column_at(table.index, positions), handed.digests)

    def _take_everything_handed(self) -> None:
        """Take every record waiting on the handover, in order."""
        if self.handover is None:
            return
        records = self.handover.records
        while records:
            self._take_handed(records.popleft())

    async def _drain_handover(self) -> None:
        """Land what is handed over as it comes (beside the workers, until they end)."""
        handover = self._open_handover()
        while True:
            await handover.wait()
            self._take_everything_handed()

    # ------------------------------------------------------------ running the workers

    def start(self, source: Source | None = None) -> None:
        """Fetch what the scheduler has pending from the primary ``source`` and the mirrors (once; again after damaged
        cached chunks were reopened, when a running download fetches them too, even while its last commits run)."""
        self.readiness.restart()  # the model is not complete until the download ends
        if self.running:
            return
        if self.pipeline is None:
            assert source is not None
            # the fetching machinery: imported when something is fetched (a cached run's cold start skips it)
            from ..cache.journal import GroupCommitter
            from .pipeline import ChunkPipeline
            from .sources import Sources
            from .workers import ROW_REQUESTS, Workers, workers_per_source

            settings = self.settings
            self.pipeline = ChunkPipeline(
                data_offset=self.data_offset,
                chunk_size_bytes=self.manifest.chunk_size_bytes,
                store=self.cache,
                plan=self.index.plan,
                stats=self.stats,
                # every connection (to every mirror) gets a thread at once, and so does each extra request for rows
                threads=max(
                    settings.verify_threads,
                    workers_per_source(settings.connections, bool(settings.mirror_urls)) * (1 + len(settings.mirror_urls)),
                )
                + ROW_REQUESTS,
                loop=self.loop,
            )
            self.committer = GroupCommitter(self.cache, self.loop, self.stats)
            self.sources = Sources(settings.url, settings.mirror_urls, self.probes, self.stats)
            self.sources.open(source)
            stream, self.header_stream = self.header_stream, None
            self.workers = Workers(
                settings,
                manifest=self.manifest,
                data_offset=self.data_offset,
                stats=self.stats,
                scheduler=self.scheduler,
                pipeline=self.pipeline,
                sources=self.sources,
                header_stream=stream,
                handover=self._open_handover(),
                bytes_to_download=self.readiness.bytes_to_download,
                rows_awaited=self.readiness.awaits_chunks,
            )
        self._task = asyncio.create_task(self._run(), name=f"streamload download {self.manifest.digest[:12]}")

    def start_delta(self) -> None:
        """The delta stream's frames, read beside the download; it hands its chunks over (``handover``)."""
        if self.delta is not None:
            self.delta.start(self._open_handover())

    async def _run(self) -> None:
        assert self.committer is not None and self.workers is not None
        try:
            while True:  # again when chunks were reopened (damaged in the cache) while the last commits ran
                await self.workers.serve(self.committer.watch(), self._drain_handover())
                self.readiness.finish()  # every layer is usable now; durability follows, before close() returns
                await self.committer.flush()
                if self.scheduler.finished:
                    await self.committer.mark_complete()
                    if self.scheduler.finished:  # no await between this test and the task's end: nothing is missed
                        break
        except BaseException as exc:  # delivered to every waiter; close() awaits this task
            from .workers import first_cause  # imported by start(), which made this task

            failure = first_cause(exc)
            if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                self.readiness.fail(asyncio.CancelledError("the download was cancelled"))
                raise
            if self.readiness.complete.done():  # the data is all here and usable; only its bookkeeping failed
                logger.warning(
                    "the model is complete but could not be recorded in the cache (%s); it will be checked again next time", failure
                )
            self.readiness.fail(failure)

    # ------------------------------------------------------------ shutdown

    async def stop(self) -> None:
        """Stop the delta stream and (an unfinished download) the workers, or let the last group commit end; then the
        pool threads. Keeps what is verified and written; gives back the store space reserved for what never came."""
        if self.delta is not None:
            await self.delta.stop()
        if self._task is not None:
            if not self.readiness.complete.done() or self.readiness.complete.exception() is not None:
                self._task.cancel()  # unfinished: stop; what is committed stays for the next run
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await self._task  # finished: the last group commit completes first
        if self.header_stream is not None:  # no worker took it (nothing was pending, or the download failed first)
            self.header_stream.close()
            self.header_stream = None
        if self.workers is not None:
            self.workers.close()
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.committer is None:
            return
        self._take_everything_handed()  # stored and verified but not reached by the drain: journaled, not fetched again
        await self.committer.close()  # stopped early or failed: keep what is verified and written
        complete = self.readiness.complete.done() and self.readiness.complete.exception() is None
        if not complete:
            table, done = self.table, self.done_mask() & (self.table.pass_index == 0)
            present = list(zip(table.raw_offset[done].tolist(), table.raw_size[done].tolist(), strict=True))
            released = await asyncio.to_thread(self.cache.release_unverified, present)
            if released:
                logger.info("gave back %d bytes reserved for chunks that never arrived", released)

    async def close_sources(self) -> None:
        """Close every mirror's source (the primary's is the origin's), once the pipeline's threads are done."""
        if self.sources is not None:
            await self.sources.close()
