"""One model's download session: header -> cache -> scheduler -> download -> layer readiness, top to bottom.

``start`` reads the header (``origin.py``: from the source with one open-ended request from byte 0 whose body goes
on into the data, or from the cache when the model is pinned and complete, or offline), opens the cache and
schedules what the journal lacks; a ``Download`` (``download.py``) then runs the workers that fetch it, and
``Readiness`` (``readiness.py``) resolves each layer's future when its last chunk lands. ``layer``, ``coarse_layer``
and ``rows`` hand out what the runtime asks for: a cached chunk is checked against its journaled digest the first time
a process uses it (a damaged one is fetched again). ``rows`` serves the rows of a row table an input needs: their
chunks are demanded without cutting the running request, and extra requests fetch them beside it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache.journal import GroupCommitter
from ..cache.model_cache import ModelCache
from ..cache.refs import write_ref
from ..errors import CacheError, DigestMismatchError, FetchError, StreamloadError
from ..formats import ChunkEntry, Manifest, QuantScheme, view_tensor
from ..formats.constants import PREAMBLE_SIZE_BYTES, LayerKind
from ..layer import Layer, distinct_rows, map_layer
from ..stats import DownloadStats, Progress
from ..tokenizer import load_tokenizer
from ..transport.httputil import RetryPolicy
from ..transport.source import Source, SpanReader
from .mirrors import HeaderProbes, check_mirrors
from .origin import Origin, split_pin
from .pipeline import ChunkPipeline
from .readiness import Readiness
from .refinements import RefinementPlan
from .schedule import ChunkScheduler
from .workers import ROW_REQUESTS, Download, workers_per_source

if TYPE_CHECKING:
    import aiohttp

    from .delta import DeltaStream

logger = logging.getLogger(__name__)

__all__ = ["DownloadSession", "default_verify_threads"]


class DownloadSession:
    """Everything behind one open ``Model``."""

    def __init__(
        self,
        source: str,
        *,
        cache_root: Path,
        digest: str | None,
        connections: int,
        session: aiohttp.ClientSession | None,
        progress: Callable[[Progress], None] | None,
        retry: RetryPolicy,
        verify_threads: int,
        headers: Mapping[str, str] | None = None,
        mirrors: Sequence[str] = (),
    ) -> None:
        self.url, self.pinned = split_pin(source, digest)
        self.mirror_urls = check_mirrors(self.url, mirrors)  # other hosts of the same file, checked by manifest digest before use
        self.cache_root = cache_root
        self.connections = max(1, connections)
        self.retry = retry
        self.progress_callback = progress
        self.verify_threads = max(1, verify_threads)
        self.loop = asyncio.get_running_loop()
        self.stats = DownloadStats()
        self.started = time.perf_counter()
        self.origin = Origin(self.url, self.pinned, cache_root=cache_root, retry=retry, session=session, headers=headers, stats=self.stats)
        self.probes = HeaderProbes(self.url, self.mirror_urls, retry, session, headers)
        # set by start(); close() copes with any of them missing
        self.cache: ModelCache | None = None
        self.pipeline: ChunkPipeline | None = None
        self.committer: GroupCommitter | None = None
        self.download: Download | None = None
        self.readiness: Readiness | None = None
        self._header_stream: SpanReader | None = None  # the header's request, going on into the data (the download takes it)
        self._temp_root: Path | None = None  # a private cache for a local file when the cache directory is not writable
        self.needed_chunks: dict[int, int] = {}  # index -> size of the chunks the layers and rows handed out depended on
        self._layers: dict[int, Layer] = {}
        self._tokenizer: Any = None
        self.delta: DeltaStream | None = None  # chunks rebuilt from a delta file against a cached version (delta.py)

    @property
    def source(self) -> Source | None:
        """Where the bytes come from (None while the header came from the cache and nothing is missing)."""
        return self.origin.source

    @property
    def complete(self) -> asyncio.Future[None]:
        assert self.readiness is not None
        return self.readiness.complete

    async def wait_complete(self) -> None:
        """Every chunk in the cache, and each one that came from it checked against its journaled digest (damaged ones
        fetched again; with no source, a CacheError): what is declared complete has been checked."""
        while True:
            assert self.readiness is not None
            await asyncio.shield(self.readiness.complete)
            if await self._check_cached(np.arange(len(self.all_chunks))):
                return

    @property
    def ready_s(self) -> list[float | None]:
        return self.readiness.ready_s if self.readiness is not None else []

    @property
    def coarse_ready_s(self) -> list[float | None]:
        return self.readiness.coarse_ready_s if self.readiness is not None else []

    # ------------------------------------------------------------ start: header, pin, cache, schedule

    async def start(self) -> None:
        header = await self.origin.cached_pinned_header()
        if header is None:
            self.probes.start()  # the mirrors' headers come beside the primary's: they are ready when the data starts
            header = await self.origin.read_header()
        self._header_stream = header.stream
        self.data_offset = header.data_offset
        self.manifest: Manifest = header.manifest
        if self.pinned is not None and self.manifest.digest != self.pinned:
            raise DigestMismatchError(
                f"{self.url} serves a model with manifest digest {self.manifest.digest}, not the pinned {self.pinned}; refusing it"
            )
        self.stats.bytes_total = self.data_offset + self.manifest.data_size_bytes
        if self.source is not None and not self.source.remote and not await asyncio.to_thread(_writable, self.cache_root):
            # a local file needs no cache to outlive the run: decompress into a private one, removed at close
            self._temp_root = Path(tempfile.mkdtemp(prefix="streamload-run-"))
            logger.warning("the cache directory %s is not writable; running %s from a temporary copy", self.cache_root, self.url)
            self.cache_root = self.origin.cache_root = self._temp_root
        self.cache = cache = ModelCache(self.cache_root, self.manifest.digest)
        remote = self.source is not None and self.source.remote

        def record() -> None:  # two small files written and fsynced: not on the event loop
            cache.write_header(header.raw)
            if remote:
                # a 304 read no header, so the source has no ETag of its own: the one revalidated stays in the ref
                etag = getattr(self.source, "etag", None) or self.origin.revalidated_etag
                write_ref(self.cache_root, self.url, self.manifest.digest, etag)
            elif self.source is not None:  # a local file: `streamload run NAME` finds it again by its cached name
                write_ref(self.cache_root, str(Path(self.url).resolve()), self.manifest.digest)

        await asyncio.to_thread(record)
        await cache.acquire()
        journaled = cache.read_journal(len(self.manifest.chunk_table) + len(self.manifest.refinement_chunks))
        store_size = await asyncio.to_thread(cache.open_store, self.manifest.store_size_bytes)
        self.store_cut_short = bool(journaled) and store_size < self.manifest.store_size_bytes
        # pass 0 and refinements, as columns: no object per chunk (a position is an index into it)
        self.all_chunks = table = self.manifest.file_order_table()
        layer_count = len(self.manifest.layers)
        self._position_of = np.full(int(table.index.max()) + 1 if len(table) else 0, -1, np.int64)  # chunk index -> position
        self._position_of[table.index] = np.arange(len(table))
        # a store cut short lost the chunks past its end, whatever the journal says
        indices = np.fromiter(journaled, np.int64, len(journaled))
        indices = indices[indices < len(self._position_of)]
        positions = self._position_of[indices]
        usable = positions >= 0
        usable[usable] = table.raw_offset[positions[usable]] + table.raw_size[positions[usable]] <= store_size
        self.journaled = {i: journaled[i] for i in indices[usable].tolist()}
        # per layer: the positions of its pass-0 chunks (in file order)
        base = np.flatnonzero(table.pass_index == 0)
        by_layer = base[np.argsort(table.layer[base], kind="stable")]
        self._layer_positions = np.split(by_layer, np.cumsum(np.bincount(table.layer[base], minlength=layer_count))[:-1])
        self.plan = RefinementPlan.build(self.manifest, table, self._layer_positions, self._position_of)
        self._checked: set[int] = set()  # layers whose cached chunks were checked against their digests in this process
        self._checked_chunks: set[int] = set()  # cached chunks checked so (rows are checked chunk by chunk)
        if self.plan.requires and self.journaled:
            await self._check_coarse_under_pending_refinements()
        pending = np.ones(len(table), bool)
        pending[self._position_of[np.fromiter(self.journaled, np.int64, len(self.journaled))]] = False
        self.stats.chunks_total = len(table)
        self.stats.chunks_cached = len(table) - int(pending.sum())
        if remote and pending.any():  # an update: chunks other cached models hold are copied, not downloaded (reuse.py)
            from ..cache.reuse import copy_shared_chunks
            from .delta import find_delta_base, open_delta  # a remote download's modules: a local run's cold start skips them

            copied = await asyncio.to_thread(copy_shared_chunks, self.cache_root, cache, table, np.flatnonzero(pending))
            self.journaled.update(copied.journaled)
            pending[self._position_of[np.fromiter(copied.journaled, np.int64, len(copied.journaled))]] = False
            self.stats.chunks_local, self.stats.bytes_local = len(copied.journaled), copied.compressed_bytes
            # the rest from a delta file against a cached version, where the manifest lists one (delta.py)
            found = await find_delta_base(self.cache_root, header.raw[PREAMBLE_SIZE_BYTES : PREAMBLE_SIZE_BYTES + self.manifest.size_bytes])
            if self._header_stream is not None and len(table) and (not pending[0] or found is not None):  # it would bring what is here
                self._header_stream.close()
                self._header_stream = None
            if found is not None:
                self.delta = await open_delta(
                    found,
                    url=self.url,
                    manifest=self.manifest,
                    cache=cache,
                    table=table,
                    pending=np.flatnonzero(pending),
                    retry=self.retry,
                    session=self.origin.borrowed_session,
                    headers=self.origin.headers,
                    stats=self.stats,
                )
        # per layer: the store offsets its chunks start at (to find a row's chunk), and the other layers holding the
        # scales of its int8 tensors (a row table's live in an execution step)
        self._chunk_starts = [table.raw_offset[positions] for positions in self._layer_positions]
        self._scales_layers: list[list[int]] = [[] for _ in self.manifest.layers]
        for tensor in self.manifest.tensors:
            scales = self.manifest.tensor_by_name.get(tensor.scales or "")
            elsewhere = self._scales_layers[tensor.layer_index]
            if scales is not None and scales.layer_index != tensor.layer_index and scales.layer_index not in elsewhere:
                elsewhere.append(scales.layer_index)
        rows = np.flatnonzero((table.layer >= self.manifest.step_count) & (table.pass_index == 0))
        rows_from = int(rows[0]) if len(rows) else len(table)
        self.scheduler = ChunkScheduler(table, self.journaled, rows_from=rows_from, requires=self.plan.requires)
        # chunks of each layer not yet stored, refinements included; pass-0 chunks only
        self.readiness = Readiness(
            self.loop,
            remaining=np.bincount(table.layer[pending], minlength=layer_count).tolist(),
            remaining_coarse=np.bincount(table.layer[pending & (table.pass_index == 0)], minlength=layer_count).tolist(),
            started=self.started,
            stats=self.stats,
            progress=self.progress_callback,
            bytes_to_download=self.scheduler.pending_bytes,
            bytes_cached=int(table.size.sum()) - self.scheduler.pending_bytes,
        )
        if self.delta is not None:  # its chunks come from the delta file, beside the download (given back if they fail)
            self.scheduler.take_positions(self.delta.positions.tolist())
        if not pending.any():
            if self._header_stream is not None:  # nothing to read from it
                self._header_stream.close()
                self._header_stream = None
            if not cache.is_complete():
                await asyncio.to_thread(cache.mark_complete)
            self.readiness.finish()
        else:
            await self._start_download()
            if self.delta is not None:
                self.delta.start(self._delta_landed, self._delta_failed)
        logger.info(
            "%s: %d of %d chunks cached, %d bytes to fetch",
            self.url,
            self.stats.chunks_cached,
            len(table),
            self.readiness.bytes_to_download,
        )

    async def _check_coarse_under_pending_refinements(self) -> None:
        """Before anything is fetched: a refinement is folded only onto coarse levels checked in this process. The cached
        pass-0 chunks under refinements still to fetch are checked against their digests now (a damaged one is fetched
        again, and every refinement folded into it with it); a refinement journaled over a pass-0 chunk that is not is
        folded again after it. Costs one xxh3 pass over those chunks' bytes."""
        assert self.cache is not None
        journaled, requires = self.journaled, self.plan.requires
        for refinement, bases in requires.items():
            if refinement in journaled and not all(b in journaled for b in bases):
                del journaled[refinement]
        under = sorted({b for refinement, bases in requires.items() if refinement not in journaled for b in bases if b in journaled})
        if not under:
            return
        table, positions = self.all_chunks, self._position_of[np.array(under, np.int64)]
        places = zip(under, table.raw_offset[positions].tolist(), table.raw_size[positions].tolist(), strict=True)
        cached = [(index, raw_offset, raw_size, journaled[index]) for index, raw_offset, raw_size in places]
        damaged = await asyncio.to_thread(self.cache.find_damaged, cached, self.plan.coarse_ranges)
        self._checked_chunks.update(under)
        for index in damaged:
            del journaled[index]
            self._checked_chunks.discard(index)
            for refinement in self.plan.refined_by.get(index, ()):
                journaled.pop(refinement.index, None)
        if damaged:
            logger.warning("%d cached chunks under refinements still to fetch differ from what was verified; fetching them", len(damaged))

    def _delta_landed(self, positions: np.ndarray, digests: list[int], frame_bytes: int) -> None:
        """Chunks rebuilt from the delta file (from ``frame_bytes`` of it) are stored: the completion route of the
        download's chunks. What they saved counts as cached for the progress reports."""
        assert self.readiness is not None and self.committer is not None
        table = self.all_chunks
        self.readiness.bytes_cached += int(table.size[positions].sum()) - frame_bytes
        self.scheduler.done(positions.tolist())
        indices = table.index[positions]
        self.readiness.landed(table.layer[positions], table.pass_index[positions], indices)
        self.stats.chunks_delta += len(positions)
        self.committer.add_columns(indices, digests)
        if self.scheduler.finished:
            self.readiness.finish()
        else:
            self.readiness.report_progress()

    def _delta_failed(self, positions: np.ndarray) -> None:
        """Chunks the delta file could not give: the download fetches them whole."""
        self.scheduler.give_back(positions.tolist())

    def _fold_chunk(self, chunk: ChunkEntry, refinement: bytes | memoryview) -> np.ndarray:
        """A verified refinement, folded into the coarse levels in the store (a pool thread)."""
        assert self.cache is not None
        return self.cache.fold_refinement(chunk.raw_offset, refinement, self.plan.shift_of[chunk.index])

    async def _start_download(self) -> None:
        """Start fetching what the scheduler has pending (once; again after a damaged cached chunk is reopened)."""
        assert self.cache is not None and self.readiness is not None
        if self.download is not None and self.download.running:
            self.readiness.restart()  # the running download fetches what was reopened, even while its last commits run
            return
        if self.origin.source is None and self.origin.offline is not None:  # offline from a partial copy: use what it holds
            self._fail_missing(self.origin.offline)
            return
        source = self.origin.source or await self.origin.reconnect(self.manifest.digest, self._what_is_missing())
        if self.download is None:
            self.pipeline = ChunkPipeline(
                data_offset=self.data_offset,
                chunk_size_bytes=self.manifest.chunk_size_bytes,
                write_chunks=self.cache.write_chunks,
                stats=self.stats,
                # every connection (to every mirror) gets a thread at once, and so does each extra request for rows
                threads=max(self.verify_threads, workers_per_source(self.connections, bool(self.mirror_urls)) * (1 + len(self.mirror_urls)))
                + ROW_REQUESTS,
                loop=self.loop,
                fold_chunk=self._fold_chunk if self.plan.requires else None,
                requires=self.plan.requires,
            )
            self.committer = GroupCommitter(self.cache, self.loop, self.stats)
            self.download = Download(
                url=self.url,
                source=source,
                manifest=self.manifest,
                data_offset=self.data_offset,
                table=self.all_chunks,
                scheduler=self.scheduler,
                pipeline=self.pipeline,
                committer=self.committer,
                readiness=self.readiness,
                stats=self.stats,
                retry=self.retry,
                connections=self.connections,
                verify_threads=self.verify_threads,
                mirror_urls=self.mirror_urls,
                probes=self.probes,
                header_stream=self._header_stream,
            )
            self._header_stream = None
        self.readiness.restart()
        self.download.start()

    def _fail_missing(self, offline: FetchError) -> None:
        """No server: each layer the cache lacks fails with what it lacks and how much; rows fail as they are asked for
        (``rows``); the layers and rows the cache holds are used."""
        table = self.all_chunks
        pending = ~self.scheduler.done_mask()
        lacking = np.bincount(table.layer[pending], weights=table.size[pending], minlength=len(self.manifest.layers))
        why = f"{self.url} cannot be reached ({offline}); a connection would fetch them"
        for index in np.flatnonzero(lacking).tolist():
            name = self.manifest.layers[index].name
            failure = FetchError(f"layer {index} ({name}) is not in the cache: {int(lacking[index])} bytes missing, and {why}")
            self.readiness.fail_layers([index], failure)
            if not self.readiness.coarse_ready[index].done():
                self.readiness.coarse_ready[index].set_exception(failure)
                self.readiness.coarse_ready[index].exception()
        self._offline_failure = FetchError(
            f"the cache of {self.manifest.digest[:12]} lacks {self.scheduler.pending_bytes} bytes of {self.stats.bytes_total}, and {why}"
        )
        if not self.readiness.complete.done():
            self.readiness.complete.set_exception(self._offline_failure)
            self.readiness.complete.exception()

    def _what_is_missing(self) -> str:
        """Which bytes the cache lacks, in words, for an error when no source can be had for them."""
        first = self.all_chunks.entry(self.scheduler.first_not_done() or 0)
        layer = f"layer {first.layer_index} ({self.manifest.layers[first.layer_index].name})"
        if self.store_cut_short:
            return f"{layer} of the cached model {self.manifest.digest[:12]} is damaged (its store was cut short)"
        return f"the cached copy of {self.manifest.digest[:12]} lacks {self.scheduler.pending_bytes} bytes from {layer} on"

    # ------------------------------------------------------------ what the runtime asks for

    async def layer(self, index: int) -> Layer:
        if not 0 <= index < len(self.manifest.layers):
            raise IndexError(f"layer {index} does not exist; the model has {len(self.manifest.layers)} layers")
        for scales_layer in self._scales_layers[index]:  # a row table's scales live in an execution step
            await self.layer(scales_layer)
        chunks = np.concatenate([self._layer_positions[index], self.plan.layer_refinements[index]])
        while True:
            if not self.readiness.ready[index].done():
                self.scheduler.prioritize(index)
            await asyncio.shield(self.readiness.ready[index])
            if index in self._checked or await self._check_cached(chunks):
                break
        self._checked.add(index)
        self._need(chunks)
        if index not in self._layers:
            assert self.cache is not None
            self._layers[index] = map_layer(self.manifest, self.cache.store_map, index)
        return self._layers[index]

    async def coarse_layer(self, index: int) -> Layer:
        """Layer ``index`` as soon as its pass-0 chunks are here: a progressive tensor at its coarse levels (a copy,
        so refinements folded in meanwhile do not change it), the rest as ``layer`` gives it. A layer with no
        progressive tensor is ``layer(index)``."""
        if not 0 <= index < len(self.manifest.layers):
            raise IndexError(f"layer {index} does not exist; the model has {len(self.manifest.layers)} layers")
        if not len(self.plan.layer_refinements[index]):
            return await self.layer(index)
        for scales_layer in self._scales_layers[index]:
            await self.layer(scales_layer)
        while True:
            if not self.readiness.coarse_ready[index].done():
                self.scheduler.prioritize(index, coarse=True)
            await asyncio.shield(self.readiness.coarse_ready[index])
            if await self._check_cached(self._layer_positions[index]):
                break
        self._need(self._layer_positions[index])
        assert self.cache is not None
        # copying the coarse levels is numpy work on a layer's bytes: off the event loop, so the download goes on
        return await asyncio.to_thread(map_layer, self.manifest, self.cache.store_map, index, coarse=True)

    async def rows(self, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``ids`` of a 2-D tensor and their scales (None for a float tensor), as soon as their chunks are here.

        For a row table only the chunks holding those rows are waited for (fetched first, beside
        the running request); for a tensor of an execution step, its whole layer.
        """
        entry = self.manifest.tensor_by_name.get(name)
        if entry is None or len(entry.shape) != 2:
            raise KeyError(f"the model has no 2-D tensor {name!r}")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= entry.shape[0]):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise IndexError(f"row {bad} of {name!r} does not exist; it has {entry.shape[0]} rows")
        scales_entry = self.manifest.tensor_by_name.get(entry.scales or "") if entry.quant is QuantScheme.INT8_ROW else None
        if self.manifest.layers[entry.layer_index].kind is not LayerKind.ROWS:
            await self.layer(entry.layer_index)
        else:
            row_bytes = entry.shape[1] * entry.dtype.size_bytes
            positions = self._positions_of_rows(entry.layer_index, entry.raw_offset, row_bytes, distinct_rows(ids))
            self._need(positions)
            while entry.layer_index not in self._checked and not await self._rows_arrived(positions):
                pass
        if scales_entry is not None:
            await self.layer(scales_entry.layer_index)
        assert self.cache is not None
        values = view_tensor(self.cache.store_map, entry)[ids]  # a copy: fancy indexing
        scales = None if scales_entry is None else view_tensor(self.cache.store_map, scales_entry)[ids]
        return values, scales

    def _positions_of_rows(self, layer_index: int, table_offset: int, row_bytes: int, ids: np.ndarray) -> np.ndarray:
        """The positions of the chunks of a row table that hold rows ``ids`` (ascending, unique), in file order."""
        positions, starts = self._layer_positions[layer_index], self._chunk_starts[layer_index]
        first = np.searchsorted(starts, table_offset + ids * row_bytes, side="right") - 1
        last = np.searchsorted(starts, table_offset + (ids + 1) * row_bytes - 1, side="right") - 1
        wanted = sorted({int(i) for lo, hi in zip(first, last, strict=True) for i in range(lo, hi + 1)})
        return positions[np.array(wanted, np.int64)]

    def _need(self, positions: np.ndarray) -> None:
        """Count these chunks as ones the layers and rows handed out depended on."""
        table = self.all_chunks
        self.needed_chunks.update(zip(table.index[positions].tolist(), table.size[positions].tolist(), strict=True))

    async def _rows_arrived(self, positions: np.ndarray) -> bool:
        """Demand these chunks (positions, ascending; no cut: extra requests fetch them) and wait; True once all are
        here and checked."""
        missing = positions[~self.scheduler.done_mask()[positions]]
        if len(missing) and getattr(self, "_offline_failure", None) is not None:
            table = self.all_chunks
            raise FetchError(
                f"the input's rows need {len(missing)} chunks ({int(table.size[missing].sum())} bytes) of layer "
                f"{int(table.layer[missing[0]])} that are not in the cache, and {self.url} cannot be reached "
                f"({self.origin.offline}); a connection would fetch them"
            )
        if len(missing):
            waiters = self.readiness.wait_for_chunks(self.all_chunks.index[missing].tolist())
            self.scheduler.demand(missing.tolist(), cut=False)
            if self.delta is not None:  # rows the delta file holds: on an extra request to it
                self.delta.demand(self.all_chunks.index[missing].tolist())
            if self.download is not None:
                self.download.start_row_requests()
            await asyncio.gather(*(asyncio.shield(w) for w in waiters))
        return await self._check_cached(positions)

    async def _check_cached(self, positions: np.ndarray) -> bool:
        """Check the given chunks (positions) that came from the cache against their journaled digests (once per process).

        True when all match. Damaged ones are fetched again (False: wait for them), or,
        with no source to fetch them from, a CacheError naming their layer.
        """
        assert self.cache is not None
        if not self.journaled:
            return True  # nothing came from the cache
        table, positions = self.all_chunks, np.asarray(positions, np.int64)
        indices = table.index[positions].tolist()
        places = zip(indices, table.raw_offset[positions].tolist(), table.raw_size[positions].tolist(), strict=True)
        cached = [
            (index, raw_offset, raw_size, self.journaled[index])
            for index, raw_offset, raw_size in places
            if index in self.journaled and index not in self._checked_chunks
        ]
        damaged = set(await asyncio.to_thread(self.cache.find_damaged, cached, self.plan.coarse_ranges)) if cached else set()
        self._checked_chunks.update(index for index, *_ in cached)
        if not damaged:
            return True
        reopened = [table.entry(p) for p, index in zip(positions.tolist(), indices, strict=True) if index in damaged]
        # a pass-0 chunk fetched again overwrites what was folded into it: its refinements are folded again after it
        refolded = {r.index: r for c in reopened for r in self.plan.refined_by.get(c.index, ()) if r.index in self.journaled}
        reopened += [r for index, r in refolded.items() if index not in damaged]
        layers = sorted({c.layer_index for c in reopened})
        names = ", ".join(f"{i} ({self.manifest.layers[i].name})" for i in layers)
        logger.warning("layer %s: %d cached chunks differ from what was verified; fetching them again", names, len(reopened))
        for chunk in reopened:
            del self.journaled[chunk.index]
            self._checked_chunks.discard(chunk.index)
        self._checked.difference_update(self.readiness.reopen(reopened))
        self.scheduler.reopen([self.scheduler.position_of(c) for c in reopened])
        try:
            await self._start_download()
        except StreamloadError as exc:
            failure = CacheError(
                f"layer {names} of the cached model {self.manifest.digest[:12]} is damaged and cannot be fetched again: {exc}"
            )
            self.readiness.fail_layers(layers, failure)
            raise failure from None
        return False

    def tokenizer(self) -> Any:
        """The embedded tokenizer.json as a ``tokenizers.Tokenizer`` (decoded once), or None."""
        if self.manifest.tokenizer is None:
            return None
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest.tokenizer)
        return self._tokenizer

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self.delta is not None:
            await self.delta.stop()
        if self.download is not None:
            await self.download.stop()
        if self._header_stream is not None:  # no download took it (nothing was pending, or starting one failed)
            self._header_stream.close()
            self._header_stream = None
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.committer is not None:
            await self.committer.close()  # stopped early or failed: keep what is verified and written
        complete = self.readiness is not None and self.readiness.complete.done() and self.readiness.complete.exception() is None
        if self.cache is not None and self.committer is not None and not complete:
            table, done = self.all_chunks, self.scheduler.done_mask() & (self.all_chunks.pass_index == 0)
            present = list(zip(table.raw_offset[done].tolist(), table.raw_size[done].tolist(), strict=True))
            released = await asyncio.to_thread(self.cache.release_unverified, present)
            if released:
                logger.info("gave back %d bytes reserved for chunks that never arrived", released)
        await self.origin.close()
        if self.download is not None:
            await self.download.close_sources()
        await self.probes.close()
        if self.cache is not None:
            self._layers.clear()
            self.cache.close()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)


def _writable(directory: Path) -> bool:
    """Whether the cache can be made here (a probe file is created and removed)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            return True
    except OSError:
        return False


def default_verify_threads() -> int:
    """Cores + 1, at most 8: one thread waits on the connection while the others compute."""
    return min(8, (os.cpu_count() or 1) + 1)
