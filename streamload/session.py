"""One model's download session: header -> cache -> scheduler -> pipeline -> layer readiness, top to bottom.

``start`` reads the header (from the source with one open-ended request from byte
0 whose body goes on into the data, or from the cache when the model is pinned and
complete, or offline), opens the cache and schedules what the journal lacks;
workers then take spans from the scheduler, open them on the source (the first one
continues the header's request) and hand them to the chunk pipeline; what it yields
goes through one completion route (``_chunks_landed``), which journals each chunk
and resolves a layer's future when its last chunk lands, and a row waiter's when
its chunk does. ``rows`` serves the rows of a row table an input needs: their
chunks are demanded without cutting the running request, and up to
ROW_REQUESTS extra requests fetch them beside it. With mirrors (``streamload.mirrors``),
each host that serves the same manifest digest gets its own workers, spans sized
by their measured rates; a host that fails or serves corrupt chunks is dropped
and the others take its share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zstandard

from .cache import GroupCommitter, ModelCache
from .errors import (
    CacheError,
    ChunkIntegrityError,
    DigestMismatchError,
    FetchError,
    FormatError,
    RetryableError,
    StalledError,
    StreamloadError,
)
from .fetch import Header, fetch_header, fetch_header_with_retries, parse_header
from .formats import ChunkEntry, Manifest, QuantScheme, view_tensor
from .formats.chunk_table import column_at
from .formats.constants import REFINEMENT_PASS, LayerKind
from .formats.reader import frame_size_bytes
from .httputil import Backoff, RetryPolicy, same_origin
from .layer import Layer, map_layer
from .mirrors import (
    MAX_BAD_CHUNKS,
    MIN_WORKERS_PER_MIRROR,
    Mirror,
    MirrorState,
    RateMeter,
    check_mirrors,
    header_mismatch,
    span_limit_bytes,
)
from .pipeline import ChunkPipeline, Landed
from .schedule import ChunkScheduler, Span
from .stats import DownloadStats, Progress
from .transport import FileSource, Source, SpanReader

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

MAX_INTEGRITY_ATTEMPTS = 3  # fetches of one chunk that fail their hash before giving up
PROGRESS_INTERVAL_S = 0.1
ROW_REQUESTS = 4  # extra parallel requests for demanded rows, beside the running ones
MAX_GAP_BYTES = 64 << 10  # a span reads over this much it does not need rather than make another request
REUSE_SKIP_BYTES = 256 << 10  # an open body goes on to the next span when that starts at most this far ahead


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def split_pin(source: str, digest: str | None) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` pins the manifest digest, like pip's hash fragments."""
    if "#sha256=" in source:
        source, _, pinned = source.partition("#sha256=")
        if digest is not None and digest.lower() != pinned.lower():
            raise DigestMismatchError(f"the URL pins sha256={pinned} but digest={digest} was also given")
        digest = pinned
    if digest is not None:
        digest = digest.lower().removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DigestMismatchError(f"pinned digest {digest!r} is not 64 hex digits")
    return source, digest


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
        self.mirrors: list[Mirror] = []  # the primary URL's, then each mirror's (made when the download starts)
        self._probes: dict[str, tuple[Source, asyncio.Task[Header]]] = {}  # mirror URL -> its header, on the way
        self.cache_root = cache_root
        self.connections = max(1, connections)
        self.retry = retry
        self.borrowed_session = session
        self.headers = headers  # the caller's, for the URL's origin only (HttpSource keeps them from other hosts)
        self.progress_callback = progress
        self.verify_threads = max(1, verify_threads)
        self.loop = asyncio.get_running_loop()
        self.stats = DownloadStats()
        self.started = time.perf_counter()
        self.complete: asyncio.Future[None] = self.loop.create_future()
        # set by start(); close() copes with any of them missing
        self.source: Source | None = None
        self.cache: ModelCache | None = None
        self.pipeline: ChunkPipeline | None = None
        self.committer: GroupCommitter | None = None
        self.ready: list[asyncio.Future[None]] = []  # per layer: every chunk stored (a progressive layer's refinements too)
        self.ready_s: list[float | None] = []
        self.coarse_ready: list[asyncio.Future[None]] = []  # per layer: its pass-0 chunks stored (coarse levels, if progressive)
        self.coarse_ready_s: list[float | None] = []
        self._download_task: asyncio.Task[None] | None = None
        self._tasks: asyncio.TaskGroup | None = None  # the running download's, for extra row requests
        self._row_requests = 0  # extra requests running for demanded rows
        self._header_stream: SpanReader | None = None  # the header's request, going on into the data
        self._temp_root: Path | None = None  # a private cache for a local file when the cache directory is not writable
        self._chunk_waiters: dict[int, asyncio.Future[None]] = {}  # chunk index -> resolved when it is stored
        self.needed_chunks: dict[int, int] = {}  # index -> size of the chunks the layers and rows handed out depended on
        self._layers: dict[int, Layer] = {}
        self._integrity_attempts: dict[int, int] = {}
        self._tokenizer: Any = None
        self._last_progress = 0.0

    # ------------------------------------------------------------ start: header, pin, cache, schedule

    async def start(self) -> None:
        header = await self._read_header()
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
            self.cache_root = self._temp_root
        self.cache = cache = ModelCache(self.cache_root, self.manifest.digest)
        remote = self.source is not None and self.source.remote

        def record() -> None:  # two small files written and fsynced: not on the event loop
            cache.write_header(header.raw)
            if remote:
                ModelCache.write_ref(self.cache_root, self.url, self.manifest.digest, getattr(self.source, "etag", None))

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
        pending = np.ones(len(table), bool)
        pending[positions[usable]] = False
        self.stats.chunks_total = len(table)
        self.stats.chunks_cached = len(table) - int(pending.sum())
        # per layer: the positions of its pass-0 chunks (in file order)
        base = np.flatnonzero(table.pass_index == 0)
        by_layer = base[np.argsort(table.layer[base], kind="stable")]
        self._layer_positions = np.split(by_layer, np.cumsum(np.bincount(table.layer[base], minlength=layer_count))[:-1])
        self._prepare_refinements()
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
        self.scheduler = ChunkScheduler(table, self.journaled, rows_from=rows_from, requires=self._requires)
        self.bytes_to_download = self.scheduler.pending_bytes
        self.bytes_cached = int(table.size.sum()) - self.bytes_to_download
        # chunks of each layer not yet stored, refinements included; pass-0 chunks only
        self.remaining = np.bincount(table.layer[pending], minlength=layer_count).tolist()
        self.remaining_coarse = np.bincount(table.layer[pending & (table.pass_index == 0)], minlength=layer_count).tolist()
        self.ready = [self.loop.create_future() for _ in self.manifest.layers]
        self.ready_s = [None] * len(self.manifest.layers)
        self.coarse_ready = [self.loop.create_future() for _ in self.manifest.layers]
        self.coarse_ready_s = [None] * len(self.manifest.layers)
        self._checked: set[int] = set()  # layers whose cached chunks were checked against their digests in this process
        self._checked_chunks: set[int] = set()  # cached chunks checked so (rows are checked chunk by chunk)
        for index, count in enumerate(self.remaining_coarse):
            if count == 0:
                self._set_coarse_ready(index)
        for index, count in enumerate(self.remaining):
            if count == 0:
                self._set_ready(index)
        if not pending.any():
            if self._header_stream is not None:  # nothing to read from it
                self._header_stream.close()
                self._header_stream = None
            if not cache.is_complete():
                await asyncio.to_thread(cache.mark_complete)
            self._finish()
        else:
            await self._start_download()
        logger.info(
            "%s: %d of %d chunks cached, %d bytes to fetch",
            self.url,
            self.stats.chunks_cached,
            len(table),
            self.bytes_to_download,
        )

    def _prepare_refinements(self) -> None:
        """For a progressive model: each layer's refinement chunks, the pass-0 chunks each one folds into (which must
        be stored first), the coarse_shift it folds with, and per pass-0 chunk the progressive ranges it holds (its
        journaled digest is of their coarse levels)."""
        manifest = self.manifest
        self._layer_refinements: list[np.ndarray] = [np.zeros(0, np.int64) for _ in manifest.layers]  # positions
        self._requires: dict[int, list[int]] = {}
        self._shift_of: dict[int, int] = {}
        self._coarse_ranges: dict[int, list[tuple[int, int, int]]] = {}
        self._refined_by: dict[int, list[ChunkEntry]] = {}  # pass-0 chunk index -> refinements folded into it
        progressive = sorted((t for t in manifest.tensors if t.coarse_shift is not None), key=lambda t: t.raw_offset)
        if not progressive:
            return
        layer_chunks = [[self.all_chunks.entry(p) for p in positions.tolist()] for positions in self._layer_positions]
        refinements: list[list[int]] = [[] for _ in manifest.layers]
        for chunk in (c for c in manifest.refinement_chunks if c.pass_index == REFINEMENT_PASS):
            refinements[chunk.layer_index].append(int(self._position_of[chunk.index]))
            starts = layer_chunks[chunk.layer_index]
            bases = [b for b in starts if b.raw_offset < chunk.raw_offset + chunk.raw_size_bytes and chunk.raw_offset < b.raw_end]
            self._requires[chunk.index] = [b.index for b in bases]
            for base in bases:
                self._refined_by.setdefault(base.index, []).append(chunk)
            self._shift_of[chunk.index] = next(
                t.coarse_shift for t in progressive if t.raw_offset <= chunk.raw_offset < t.raw_end and t.coarse_shift is not None
            )
        self._layer_refinements = [np.array(positions, np.int64) for positions in refinements]
        for chunks in layer_chunks:
            for base in chunks:
                for tensor in progressive:
                    start, end = max(base.raw_offset, tensor.raw_offset), min(base.raw_end, tensor.raw_end)
                    if start < end and tensor.coarse_shift is not None:
                        self._coarse_ranges.setdefault(base.index, []).append((start, end - start, tensor.coarse_shift))

    def _fold_chunk(self, chunk: ChunkEntry, refinement: bytes | memoryview) -> np.ndarray:
        """A verified refinement, folded into the coarse levels in the store (a pool thread)."""
        assert self.cache is not None
        return self.cache.fold_refinement(chunk.raw_offset, refinement, self._shift_of[chunk.index])

    async def _start_download(self) -> None:
        """Start fetching what the scheduler has pending (once; again after a damaged cached chunk is reopened)."""
        if self._download_task is not None and not self._download_task.done():
            return
        await self._ensure_source()
        assert self.cache is not None
        if self.pipeline is None:
            self.pipeline = ChunkPipeline(
                data_offset=self.data_offset,
                chunk_size_bytes=self.manifest.chunk_size_bytes,
                write_chunks=self.cache.write_chunks,
                stats=self.stats,
                # every connection (to every mirror) gets a thread at once, and so does each extra request for rows
                threads=max(self.verify_threads, self._workers_per_source() * (1 + len(self.mirror_urls))) + ROW_REQUESTS,
                loop=self.loop,
                fold_chunk=self._fold_chunk if self._requires else None,
                requires=self._requires,
            )
            self.committer = GroupCommitter(self.cache, self.loop, self.stats)
        if self.complete.done():
            self.complete = self.loop.create_future()
        self._download_task = asyncio.create_task(self._download(), name=f"streamload download {self.manifest.digest[:12]}")

    async def _ensure_source(self) -> None:
        """A source for the bytes the cache lacks: the one the header came from, or (the header came from the cache)
        the URL again, checked to serve the same model. Offline, a clear error."""
        if self.source is not None:
            return
        first = self.all_chunks.entry(self.scheduler.first_not_done() or 0)
        layer = f"layer {first.layer_index} ({self.manifest.layers[first.layer_index].name})"
        if self.store_cut_short:
            missing = f"{layer} of the cached model {self.manifest.digest[:12]} is damaged (its store was cut short)"
        else:
            missing = f"the cached copy of {self.manifest.digest[:12]} lacks {self.scheduler.pending_bytes} bytes from {layer} on"
        if not is_url(self.url):
            raise CacheError(f"{missing}, and {self.url} is not a source of it")
        from .http_source import HttpSource

        source = HttpSource(self.url, self.retry, self.borrowed_session, self.headers)
        try:
            header = await self._fetch_with_retries(source, give_up_unreachable=True)
        except FetchError as exc:
            await source.close()
            raise FetchError(f"{missing} and {self.url} cannot be reached ({exc}); connect and run again") from None
        if header.manifest.digest != self.manifest.digest:
            await source.close()
            raise DigestMismatchError(
                f"{missing}, and {self.url} now serves another model ({header.manifest.digest[:12]}); "
                f"run without the pin to use it, or `streamload rm {self.manifest.digest[:12]}`"
            )
        self.source = source
        self.stats.bytes_downloaded += len(header.raw)

    async def _read_header(self) -> Header:
        """Preamble and manifest from the file, the cache (pinned and complete: no network), or the server."""
        if not is_url(self.url):
            self.source = FileSource(Path(self.url))
            return await fetch_header(self.source)
        if self.pinned is not None:
            cached = await self._cached_header(self.pinned)
            if cached is not None:
                logger.info("using cached %s (pinned, complete): no network", self.pinned[:12])
                return cached
        from .http_source import HttpSource  # a local or pinned cached model never loads the HTTP clients

        self._start_probes()  # the mirrors' headers come beside the primary's: they are ready when the data starts
        self.source = HttpSource(self.url, self.retry, self.borrowed_session, self.headers)
        # one open-ended request whose body goes on into the data; a header probe when the URL's model is cached whole
        # (an open body would bring data nobody reads, on a metered link too), and before it, when the server gave
        # that copy an ETag, one conditional request: a 304 means the cached copy is the file, and nothing is read
        cached = await self._complete_copy_of_url()
        etag = ModelCache.read_ref_etag(self.cache_root, self.url) if cached is not None else None
        if cached is not None and etag is not None and await self._unchanged(etag):
            logger.info("%s is unchanged (ETag %s): using the cached %s", self.url, etag, cached.manifest.digest[:12])
            return cached
        stream = cached is None
        try:
            # nobody answering ends the retries at once when the cache holds a complete copy to fall back to
            header = await self._fetch_with_retries(self.source, give_up_unreachable=cached is not None, stream=stream)
        except FetchError as exc:
            return await self._offline_header(exc, cached)
        self.stats.bytes_downloaded += len(header.raw)
        return header

    async def _unchanged(self, etag: str) -> bool:
        """The server says (304) the URL still has the cached copy's ETag; any failure: False (the header is fetched)."""
        unchanged = getattr(self.source, "unchanged", None)
        if unchanged is None:
            return False
        try:
            return await unchanged(etag)
        except (FetchError, OSError, TimeoutError) as exc:
            logger.debug("%s: revalidating the cached copy failed (%s)", self.url, exc)
            return False

    async def _fetch_with_retries(self, source: Source, *, give_up_unreachable: bool = False, stream: bool = False) -> Header:
        """The source's header, retrying with backoff. A server that cannot be reached at all (connection refused,
        no such host) ends the retries at once with ``give_up_unreachable``."""

        async def give_up(failure: RetryableError | StalledError) -> bool:
            return give_up_unreachable and bool(getattr(failure, "unreachable", False))

        return await fetch_header_with_retries(source, self.retry, give_up=give_up, stream=stream)

    async def _complete_copy_of_url(self) -> Header | None:
        digest = ModelCache.read_ref(self.cache_root, self.url)
        return await self._cached_header(digest) if digest else None

    async def _offline_header(self, failure: FetchError, cached: Header | None) -> Header:
        """The server cannot be reached: the complete cached copy this URL last had, or the failure."""
        if cached is None:
            raise failure
        logger.warning("%s; using the cached copy %s", failure, cached.manifest.digest[:12])
        if self.source is not None:
            await self.source.close()
        self.source = None
        return cached

    async def _cached_header(self, digest: str) -> Header | None:
        """The header of a complete cached model, or None (also when the cached header is damaged: it is fetched again)."""
        try:
            cached = ModelCache(self.cache_root, digest)
        except CacheError:
            return None
        raw = cached.read_header() if cached.is_complete() else None
        if raw is None:
            return None
        try:
            return await parse_header(raw, None)
        except FormatError as exc:
            logger.warning("the cached header of %s is damaged (%s); it is fetched again", digest[:12], exc)
            return None

    # ------------------------------------------------------------ readiness

    def _set_ready(self, index: int) -> None:
        self._set_coarse_ready(index)
        if not self.ready[index].done():
            self.ready[index].set_result(None)
            self.ready_s[index] = time.perf_counter() - self.started

    def _set_coarse_ready(self, index: int) -> None:
        if not self.coarse_ready[index].done():
            self.coarse_ready[index].set_result(None)
            self.coarse_ready_s[index] = time.perf_counter() - self.started

    def _finish(self) -> None:
        """Every chunk is verified and stored: the model is usable (durability follows, before close() returns)."""
        if self.complete.done():
            return
        self.stats.seconds = time.perf_counter() - self.started
        self.complete.set_result(None)
        self._report_progress(force=True)

    def _fail(self, exc: BaseException) -> None:
        for future in (*self.ready, *self.coarse_ready, *self._chunk_waiters.values(), self.complete):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: a failure nobody awaits is not "never retrieved"

    async def layer(self, index: int) -> Layer:
        if not 0 <= index < len(self.manifest.layers):
            raise IndexError(f"layer {index} does not exist; the model has {len(self.manifest.layers)} layers")
        for scales_layer in self._scales_layers[index]:  # a row table's scales live in an execution step
            await self.layer(scales_layer)
        chunks = np.concatenate([self._layer_positions[index], self._layer_refinements[index]])
        while True:
            if not self.ready[index].done():
                self.scheduler.prioritize(index)
            await asyncio.shield(self.ready[index])
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
        if not len(self._layer_refinements[index]):
            return await self.layer(index)
        for scales_layer in self._scales_layers[index]:
            await self.layer(scales_layer)
        while True:
            if not self.coarse_ready[index].done():
                self.scheduler.prioritize(index, coarse=True)
            await asyncio.shield(self.coarse_ready[index])
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
            chunks = self._chunks_of_rows(entry.layer_index, entry.raw_offset, row_bytes, np.unique(ids))
            self.needed_chunks.update((c.index, c.size_bytes) for c in chunks)
            while entry.layer_index not in self._checked and not await self._rows_arrived(chunks):
                pass
        if scales_entry is not None:
            await self.layer(scales_entry.layer_index)
        assert self.cache is not None
        values = view_tensor(self.cache.store_map, entry)[ids]  # a copy: fancy indexing
        scales = None if scales_entry is None else view_tensor(self.cache.store_map, scales_entry)[ids]
        return values, scales

    def _chunks_of_rows(self, layer_index: int, table_offset: int, row_bytes: int, ids: np.ndarray) -> list[ChunkEntry]:
        """The chunks of a row table that hold rows ``ids`` (ascending, unique), in file order."""
        positions, starts = self._layer_positions[layer_index], self._chunk_starts[layer_index]
        first = np.searchsorted(starts, table_offset + ids * row_bytes, side="right") - 1
        last = np.searchsorted(starts, table_offset + (ids + 1) * row_bytes - 1, side="right") - 1
        wanted = sorted({int(i) for lo, hi in zip(first, last, strict=True) for i in range(lo, hi + 1)})
        return [self.all_chunks.entry(int(positions[i])) for i in wanted]

    def _need(self, positions: np.ndarray) -> None:
        """Count these chunks as ones the layers and rows handed out depended on."""
        table = self.all_chunks
        self.needed_chunks.update(zip(table.index[positions].tolist(), table.size[positions].tolist(), strict=True))

    async def _rows_arrived(self, chunks: list[ChunkEntry]) -> bool:
        """Demand these chunks (no cut: extra requests fetch them) and wait; True once all are here and checked."""
        missing = [c for c in chunks if self.scheduler.is_pending_or_taken(c)]
        if missing:
            waiters = []
            for chunk in missing:
                waiter = self._chunk_waiters.get(chunk.index)
                if waiter is None:
                    waiter = self._chunk_waiters[chunk.index] = self.loop.create_future()
                waiters.append(waiter)
            self.scheduler.demand(sorted(self.scheduler.position_of(c) for c in missing), cut=False)
            self._start_row_requests()
            await asyncio.gather(*(asyncio.shield(w) for w in waiters))
        return await self._check_cached(np.array([self.scheduler.position_of(c) for c in chunks], np.int64))

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
        damaged = set(await asyncio.to_thread(self.cache.find_damaged, cached, self._coarse_ranges)) if cached else set()
        self._checked_chunks.update(index for index, *_ in cached)
        if not damaged:
            return True
        reopened = [table.entry(p) for p, index in zip(positions.tolist(), indices, strict=True) if index in damaged]
        # a pass-0 chunk fetched again overwrites what was folded into it: its refinements are folded again after it
        refolded = {r.index: r for c in reopened for r in self._refined_by.get(c.index, ()) if r.index in self.journaled}
        reopened += [r for index, r in refolded.items() if index not in damaged]
        layers = sorted({c.layer_index for c in reopened})
        names = ", ".join(f"{i} ({self.manifest.layers[i].name})" for i in layers)
        logger.warning("layer %s: %d cached chunks differ from what was verified; fetching them again", names, len(reopened))
        for chunk in reopened:
            del self.journaled[chunk.index]
            self._checked_chunks.discard(chunk.index)
            self.remaining[chunk.layer_index] += 1
            if not chunk.pass_index:
                self.remaining_coarse[chunk.layer_index] += 1
        for index in layers:
            self._checked.discard(index)
            if self.ready[index].done():
                self.ready[index] = self.loop.create_future()
                self.ready_s[index] = None
            if self.remaining_coarse[index] and self.coarse_ready[index].done():
                self.coarse_ready[index] = self.loop.create_future()
                self.coarse_ready_s[index] = None
        self.scheduler.reopen([self.scheduler.position_of(c) for c in reopened])
        try:
            await self._start_download()
        except StreamloadError as exc:
            failure = CacheError(
                f"layer {names} of the cached model {self.manifest.digest[:12]} is damaged and cannot be fetched again: {exc}"
            )
            for index in layers:
                if not self.ready[index].done():
                    self.ready[index].set_exception(failure)
                    self.ready[index].exception()
            raise failure from None
        return False

    def tokenizer(self) -> Any:
        """The embedded tokenizer.json as a ``tokenizers.Tokenizer`` (decoded once), or None."""
        blob = self.manifest.tokenizer
        if blob is None:
            return None
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            try:
                whole_frame = frame_size_bytes(blob.data) == len(blob.data)
            except ValueError:
                whole_frame = False
            if not whole_frame or zstandard.frame_content_size(blob.data) != blob.raw_size_bytes:
                raise FormatError("the embedded tokenizer is not one zstd frame of the size the manifest says")
            text = zstandard.ZstdDecompressor().decompress(blob.data, max_output_size=blob.raw_size_bytes)
            try:
                self._tokenizer = Tokenizer.from_str(text.decode("utf-8"))
            except Exception as exc:  # tokenizers raises plain Exception on bad JSON
                raise FormatError(f"the embedded tokenizer.json cannot be loaded: {exc}") from None
        return self._tokenizer

    def _report_progress(self, force: bool = False) -> None:
        if self.progress_callback is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self.progress_callback(
            Progress(
                bytes_downloaded=self.stats.bytes_downloaded,
                bytes_to_download=self.bytes_to_download,
                layers_ready=sum(1 for f in self.ready if f.done() and not f.exception()),
                layers_total=len(self.ready),
                elapsed_s=now - self.started,
                bytes_cached=self.bytes_cached,
                bytes_total=self.stats.bytes_total,
            )
        )

    # ------------------------------------------------------------ the download

    async def _download(self) -> None:
        assert self.source is not None and self.committer is not None
        if not self.mirrors:  # the primary first: its header is the model's; the others are probed against it
            self.mirrors = [Mirror(self.url, self.source, MirrorState.LIVE)] + [Mirror(url) for url in self.mirror_urls]
        try:
            try:
                async with asyncio.TaskGroup() as tasks:
                    self._tasks = tasks
                    watcher = tasks.create_task(self.committer.watch())
                    if self._chunk_waiters:
                        self._start_row_requests()  # rows were demanded before this download started
                    serving = [tasks.create_task(self._serve(mirror)) for mirror in self.mirrors if mirror.usable]
                    while not self.scheduler.finished:  # a source that fails for good raises when no other is left
                        await self.scheduler.wait_for_change()
                    watcher.cancel()
                    for task in serving:  # a mirror still being probed, or workers waiting out a backoff
                        task.cancel()
            finally:
                self._tasks = None
            self._finish()  # every layer is usable now; durability follows, before close() returns
            await self.committer.flush()
            await self.committer.mark_complete()
        except BaseException as exc:  # delivered to every waiter; close() awaits this task
            failure = first_cause(exc)
            if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                self._fail(asyncio.CancelledError("the download was cancelled"))
                raise
            if self.complete.done():  # the data is all here and usable; only its bookkeeping failed
                logger.warning(
                    "the model is complete but could not be recorded in the cache (%s); it will be checked again next time", failure
                )
            self._fail(failure)

    def _workers_per_source(self) -> int:
        """``connections`` per source; with mirrors at least MIN_WORKERS_PER_MIRROR each (no idle link between spans)."""
        return self.connections if not self.mirror_urls else max(MIN_WORKERS_PER_MIRROR, self.connections)

    async def _serve(self, mirror: Mirror) -> None:
        """One source's workers, after (for a mirror) its header matched the model's."""
        assert self._tasks is not None
        if mirror.state is MirrorState.PROBING and not await self._probe(mirror):
            return
        assert mirror.source is not None
        if self._ignores_range(mirror):
            return
        workers = 1 if not mirror.source.remote or mirror.source.whole_file_only else self._workers_per_source()
        threads = -(-self.verify_threads // (workers * len(self.mirrors)))
        await asyncio.gather(*(self._tasks.create_task(self._worker(mirror, threads)) for _ in range(workers)))

    def _start_probes(self) -> None:
        """Fetch each mirror's header (a bounded request; retried, but not when nobody answers), as tasks that
        ``_probe`` awaits or ``close`` cancels."""
        from .http_source import HttpSource

        async def unreachable(failure: RetryableError | StalledError) -> bool:
            return bool(getattr(failure, "unreachable", False))

        for url in self.mirror_urls:
            if url not in self._probes:
                headers = self.headers if same_origin(url, self.url) else None  # credentials stay on the primary's origin
                source = HttpSource(url, self.retry, self.borrowed_session, headers)
                task = asyncio.create_task(fetch_header_with_retries(source, self.retry, give_up=unreachable), name=f"probe {url}")
                self._probes[url] = (source, task)

    async def _probe(self, mirror: Mirror) -> bool:
        """Check a mirror's header against the model's; True when it serves the same model.
        Otherwise it is dropped, named in the log."""
        self._start_probes()
        source, task = self._probes.pop(mirror.url)
        try:
            header = await task
            problem = header_mismatch(header, self.manifest.digest, self.data_offset)
        except (FetchError, FormatError) as exc:
            header, problem = None, f"its header cannot be read ({exc})"
        if problem is not None or header is None:
            await source.close()
            self._drop(mirror, problem or "no header")
            return False
        mirror.source, mirror.state = source, MirrorState.LIVE
        self.scheduler.notify()  # chunks others served corrupt, left for it, may be taken now
        self._count_bytes(mirror, len(header.raw))
        logger.info("mirror %s serves the same model %s: it takes a share of the download", mirror.url, self.manifest.digest[:12])
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
        logger.warning("%s: %s; the other sources take its share", mirror.url, reason)

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
        return max(self.manifest.chunk_size_bytes, min(64 << 20, self.bytes_to_download // (4 * self.connections)))

    def _avoid(self, mirror: Mirror) -> frozenset[int]:
        """Positions of chunks this mirror served corrupt, while another mirror (live or being probed) has not."""
        if not mirror.bad_chunks:
            return frozenset()
        return frozenset(
            self.scheduler.position_of(chunk)
            for index, chunk in mirror.bad_chunks.items()
            if any(m.usable and index not in m.bad_chunks for m in self.mirrors)
        )

    def _start_row_requests(self) -> None:
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
        assert source is not None and self.pipeline is not None
        backoff = Backoff(self.retry, f"downloading {mirror.url}")
        meter = None if rows_only else RateMeter()
        if meter is not None:
            mirror.meters.append(meter)
        body: SpanReader | None = None  # an open-ended body this worker may go on reading
        try:
            while not self.scheduler.finished and mirror.state is MirrorState.LIVE and not self._ignores_range(mirror):
                span = None
                avoid = self._avoid(mirror)
                if body is None and not rows_only and self._header_stream is not None and mirror is self.mirrors[0]:
                    body, self._header_stream = self._header_stream, None
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
                finally:
                    if reader is not None:
                        reader.close()
                    mirror.spans.discard(span)
                    if meter is not None:
                        meter.record(span.received_bytes(), time.perf_counter() - opened)
                    self.scheduler.finish_span(span)  # before any backoff: what did not arrive is for the others now
                    if self._chunk_waiters and self.scheduler.urgent_waiting():
                        self._start_row_requests()  # demanded rows given back by a cut span: fetch them beside it
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
        assert self.committer is not None and mirror.source is not None
        stored, table = landed.stored, self.all_chunks
        if mirror.source.remote:
            self._count_bytes(mirror, landed.size_bytes)
        for position, failure in landed.failed:
            fatal = self._integrity_failed(table.entry(position), failure, mirror)
            if fatal is not None:
                span.stop(fatal)
        self.scheduler.done(stored)
        remaining, remaining_coarse, waiters = self.remaining, self.remaining_coarse, self._chunk_waiters
        layers, passes = column_at(table.layer, stored), column_at(table.pass_index, stored)
        if len(stored) and (layers[0], passes[0]) == (layers[-1], passes[-1]):
            layer_index = int(layers[0])  # a batch within one layer and pass (each is contiguous in file order)
            if not passes[0]:
                remaining_coarse[layer_index] -= len(stored)
                if remaining_coarse[layer_index] == 0:
                    self._set_coarse_ready(layer_index)
            remaining[layer_index] -= len(stored)
            if remaining[layer_index] == 0:
                self._set_ready(layer_index)
        elif len(stored):
            for layer_index, count in zip(*np.unique(layers[passes == 0], return_counts=True), strict=True):
                remaining_coarse[layer_index] -= int(count)
                if remaining_coarse[layer_index] == 0:
                    self._set_coarse_ready(int(layer_index))
            for layer_index, count in zip(*np.unique(layers, return_counts=True), strict=True):
                remaining[layer_index] -= int(count)
                if remaining[layer_index] == 0:
                    self._set_ready(int(layer_index))
        indices = column_at(table.index, stored)
        if waiters:
            for index in indices.tolist():
                waiter = waiters.pop(index, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
        self.stats.chunks_fetched += len(stored)
        self.committer.add_columns(indices, landed.digests)
        if self.scheduler.finished:
            self._finish()  # now, not when a group commit still running ends
        else:
            self._report_progress()

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
            logger.warning("%s (from %s); fetching it from %s", exc, mirror.url, " or ".join(m.url for m in untried))
        else:
            logger.warning("%s; fetching it again", exc)
        self.scheduler.give_back([self.scheduler.position_of(chunk)])
        others = [m for m in self.mirrors if m is not mirror and m.state is MirrorState.LIVE]
        if len(mirror.bad_chunks) >= MAX_BAD_CHUNKS and others:
            self._drop(mirror, f"{len(mirror.bad_chunks)} chunks from it failed their sha256 check")
        return None

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self._download_task is not None:
            if not self.complete.done() or self.complete.exception() is not None:
                self._download_task.cancel()  # unfinished: stop; what is committed stays for the next run
            try:
                await self._download_task  # finished: the last group commit completes first
            except (asyncio.CancelledError, StreamloadError):
                pass
        if self._header_stream is not None:  # no worker took it (the download failed first, or nothing was pending)
            self._header_stream.close()
            self._header_stream = None
        if self.pipeline is not None:
            self.pipeline.shutdown()
        if self.committer is not None:
            await self.committer.close()  # stopped early or failed: keep what is verified and written
        if self.cache is not None and self.committer is not None and not (self.complete.done() and self.complete.exception() is None):
            table, done = self.all_chunks, self.scheduler.done_mask() & (self.all_chunks.pass_index == 0)
            present = list(zip(table.raw_offset[done].tolist(), table.raw_size[done].tolist(), strict=True))
            released = await asyncio.to_thread(self.cache.release_unverified, present)
            if released:
                logger.info("gave back %d bytes reserved for chunks that never arrived", released)
        if self.source is not None:
            await self.source.close()
        for mirror in self.mirrors:
            if mirror.source is not None and mirror.source is not self.source:
                await mirror.source.close()
        for source, task in self._probes.values():  # never awaited: the download did not start, or ended first
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await task
            await source.close()
        self._probes.clear()
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
