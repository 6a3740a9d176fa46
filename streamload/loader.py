"""Open a model from a URL or a local .slm and get its layers as they arrive.

The data path, top to bottom: read the header (``fetch``) -> find or create the
cache (``cache``) -> schedule pending chunks in layer order (``schedule``) ->
ranged GET -> verify sha256 -> decompress -> store into the memory-mapped layer
store -> journal the chunk -> when a layer's last chunk lands, its future
resolves and callers get zero-copy numpy views.

Two receive paths feed the same verify/store step. 206 bodies over http or https
(the common case: the bundled server, nginx, any static host or CDN) are received
by the pool threads themselves, in turn, from one connection (``_SpanPump``): a
thread receives (and decrypts) a chunk, then hashes, decompresses and stores it
while the next thread receives, so each chunk stays in one core's cache from
socket to store and the event loop only does bookkeeping. Everything else (a 200
with the whole file, encoded bodies, TLS the fast path cannot settle, a borrowed
aiohttp session) is read by aiohttp on the event loop and handed to the pool
chunk by chunk.

Costs: one copy of each compressed chunk (socket to buffer) and one of each raw
chunk (pwrite into the page cache, faster and steadier than faulting in fresh
file-backed pages); threads = ``verify_threads``; memory = the page cache of the
store plus one compressed chunk buffer per thread (aiohttp path: up to
4 x threads + 2 buffers, recycled).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import io
import logging
import mmap
import os
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import zstandard

from .cache import ModelCache, default_cache_dir
from .errors import ChunkIntegrityError, DigestMismatchError, FetchError, FormatError, StalledError, StreamloadError
from .fetch import BodyKind, BodyReader, Backoff, Header, HttpOrigin, RangeResponse, RetryPolicy, body_errors, fetch_header, http_status_error, parse_header
from .rawhttp import RawRange
from .errors import RetryableError, TransportStatus, TransportUnsupported
from .formats import ChunkEntry, Manifest, QuantScheme, decompress_chunk, verify_chunk, view_tensor
from .formats.constants import PREAMBLE_SIZE_BYTES
from .formats.reader import header_size_needed
from .schedule import ChunkScheduler

logger = logging.getLogger(__name__)

MAX_INTEGRITY_ATTEMPTS = 3  # fetches of one chunk that fail their hash before giving up
PROGRESS_INTERVAL_S = 0.1
READ_BUFFER_BYTES = 4 << 20
# Group commit: fdatasync the store, then journal what it made durable; a power cut loses at most
# the chunks stored since the last commit. While the network is the bottleneck (receivers waited
# for at least NETWORK_BOUND_WAIT_SHARE of the time since the last commit) commits cost nothing
# and come every COMMIT_INTERVAL_S; while the CPU is, the writeback they force competes with the
# pipeline (it slowed loopback fetches measurably on the benchmark VM), so they come every
# COMMIT_MAX_INTERVAL_S.
COMMIT_INTERVAL_S = 1.0
COMMIT_MAX_INTERVAL_S = 5.0
NETWORK_BOUND_WAIT_SHARE = 0.5
IN_FLIGHT_PER_THREAD = 4  # received chunks queued per verify thread: keeps the pool fed through scheduling gaps


def commit_due(since_s: float, receive_wait_s: float) -> bool:
    """Whether a group commit is due ``since_s`` after the last one, receivers having waited ``receive_wait_s`` meanwhile."""
    network_bound = receive_wait_s >= NETWORK_BOUND_WAIT_SHARE * since_s
    return since_s >= COMMIT_MAX_INTERVAL_S or (since_s >= COMMIT_INTERVAL_S and network_bound)


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for progress callbacks."""

    bytes_downloaded: int  # moved over the network in this run
    bytes_to_download: int  # compressed bytes the cache lacked when the run started
    layers_ready: int
    layers_total: int
    elapsed_s: float

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_downloaded / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(slots=True)
class DownloadStats:
    """What a run moved and how (mutable: updated while the download runs)."""

    bytes_downloaded: int = 0  # network bytes in this run (bodies), headers excluded
    bytes_total: int = 0  # size of the .slm file
    chunks_total: int = 0
    chunks_cached: int = 0  # already in the cache when the run started
    chunks_fetched: int = 0
    integrity_failures: int = 0
    retries: int = 0
    seconds: float = 0.0
    receive_wait_s: float = 0.0  # waiting for body bytes (summed over connections)
    verify_s: float = 0.0  # sha256, summed over pool threads
    decompress_s: float = 0.0  # zstd, summed over pool threads
    store_s: float = 0.0  # pwrite into the store, summed over pool threads
    commit_s: float = 0.0  # fdatasync + journal on the commit thread (off the data path)


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One layer's tensors: read-only numpy views of the memory-mapped store."""

    index: int
    name: str
    tensors: Mapping[str, np.ndarray]
    quant: Mapping[str, str]  # tensor name -> scales tensor name, for int8_row tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, per-row scales) for an int8 tensor, (values, None) for a float one."""
        scales = self.quant.get(name)
        return self.tensors[name], None if scales is None else self.tensors[scales]


@dataclasses.dataclass(frozen=True, slots=True)
class LayerSpans:
    """When one layer moved through the pipeline (perf_counter seconds)."""

    index: int
    name: str
    download: tuple[float, float] | None  # first chunk's receive start, last chunk's receive end
    decompress: tuple[float, float] | None  # first chunk's verify start, last chunk stored


class Model:
    """An open model. Layers become available in execution order while the download runs.

    Get one with ``streamload.open``; see its example.
    """

    def __init__(self, loader: _Loader) -> None:
        self._loader = loader

    @property
    def manifest(self) -> Manifest:
        return self._loader.manifest

    @property
    def config(self) -> Mapping[str, Any]:
        return self._loader.manifest.config

    @property
    def digest(self) -> str:
        return self._loader.manifest.digest

    @property
    def path(self) -> Path:
        """The model's cache directory."""
        return self._loader.cache.directory

    @property
    def stats(self) -> DownloadStats:
        return self._loader.stats

    @property
    def opened_at(self) -> float:
        """``time.perf_counter()`` when the model was opened: layer_ready_s counts from here."""
        return self._loader.started

    @property
    def layer_ready_s(self) -> list[float | None]:
        """Seconds from open until each layer was ready (None: not yet)."""
        return list(self._loader.ready_s)

    @property
    def tokenizer(self) -> Any:
        """The embedded tokenizer as a ``tokenizers.Tokenizer`` (None when the model has none)."""
        return self._loader.tokenizer()

    def layer_spans(self) -> list[LayerSpans]:
        """Per layer, when its chunks were received and when they were verified+decompressed+stored
        (``time.perf_counter()`` values; None for layers that came from the cache)."""
        spans = []
        for layer in self.manifest.layers:
            times = [self._loader.chunk_spans[c.index] for c in self.manifest.chunks_of_layer(layer.index) if c.index in self._loader.chunk_spans]
            if not times:
                spans.append(LayerSpans(layer.index, layer.name, None, None))
                continue
            spans.append(
                LayerSpans(
                    layer.index,
                    layer.name,
                    (min(t[0] for t in times), max(t[1] for t in times)),
                    (min(t[2] for t in times), max(t[3] for t in times)),
                )
            )
        return spans

    async def layer(self, index: int) -> Layer:
        """Wait for layer ``index`` (moving it to the front of the queue) and return its tensors.

        Raises:
            IndexError: no such layer.
            StreamloadError: the download failed (ChunkIntegrityError, FetchError, CacheError...).
        """
        return await self._loader.layer(index)

    async def layers(self) -> AsyncIterator[tuple[int, Layer]]:
        """Yield (index, layer) in execution order, each as soon as it is ready."""
        for index in range(len(self.manifest.layers)):
            yield index, await self.layer(index)

    async def wait_complete(self) -> DownloadStats:
        """Wait until every chunk is in the cache; returns the run's stats."""
        await asyncio.shield(self._loader.complete)
        return self._loader.stats


def _first_cause(exc: BaseException) -> BaseException:
    """The error to show for a failed task group: its first StreamloadError, else its first error."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    leaves: list[BaseException] = []
    pending: list[BaseException] = [exc]
    while pending:
        item = pending.pop(0)
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    return next((e for e in leaves if isinstance(e, StreamloadError)), leaves[0] if leaves else exc)


def new_session() -> aiohttp.ClientSession:
    """A session tuned for large bodies: a 4 MiB read buffer means one 1 MiB chunk needs no
    pause/resume cycles of the transport (aiohttp's 64 KiB default costs ~8 per chunk)."""
    return aiohttp.ClientSession(auto_decompress=False, read_bufsize=READ_BUFFER_BYTES)


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _split_pin(source: str, digest: str | None) -> tuple[str, str | None]:
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


class _SpanPump:
    """One span of contiguous chunks on one connection, received by pool threads in turn.

    Leader/follower: a thread takes the next chunk under ``lock``, receives it
    into its own buffer, lets go of the lock and verifies, decompresses and
    stores that chunk while the next thread receives the one after. Chunks are
    received in file order, so layers still complete in execution order.
    ``stop`` (any thread) ends the span at the next chunk boundary; a stop with an
    error also aborts the connection, so a thread blocked on a slow link fails at once.
    """

    def __init__(self, span: list[ChunkEntry], stream: RawRange) -> None:
        self.span = span
        self.stream = stream
        self.lock = threading.Lock()
        self.received = 0  # chunks of span[:received] came off the socket
        self.stopped = False
        self.error: BaseException | None = None  # the first failure; the span's outcome

    def stop(self, error: BaseException | None = None) -> None:
        self.stopped = True
        if error is not None and self.error is None:
            self.error = error
            self.stream.abort()


class _Loader:
    """The machinery behind a Model: header, cache, scheduler, workers, readiness."""

    def __init__(
        self,
        source: str,
        *,
        cache_dir: Path,
        digest: str | None,
        connections: int,
        session: aiohttp.ClientSession | None,
        progress: Callable[[Progress], None] | None,
        retry: RetryPolicy,
        verify_threads: int,
    ) -> None:
        self.source, self.pinned = _split_pin(source, digest)
        self.cache_root = cache_dir
        self.connections = max(1, connections)
        self.retry = retry
        self.progress_callback = progress
        self.stats = DownloadStats()
        self.started = time.perf_counter()
        self._own_session = session is None and _is_url(self.source)
        self.session = session
        self.origin: HttpOrigin | None = None
        self.local_map: memoryview | None = None
        self.data_offset = 0
        self.whole_file_only = False  # the server ignores Range
        self.loop = asyncio.get_running_loop()
        self.verify_threads = max(1, verify_threads)
        # every connection's pump gets at least one thread at once, so no open connection waits on another
        self.pool = concurrent.futures.ThreadPoolExecutor(max(self.verify_threads, self.connections), thread_name_prefix="streamload-verify")
        self.in_flight = asyncio.Semaphore(IN_FLIGHT_PER_THREAD * max(1, verify_threads) + 2)  # bounded memory: chunks waiting for a thread
        self.complete: asyncio.Future[None] = self.loop.create_future()
        self._download_task: asyncio.Task[None] | None = None
        self._last_progress = 0.0
        self._integrity_attempts: dict[int, int] = {}
        self._tokenizer: Any = None
        self._layers: dict[int, Layer] = {}
        self.free_buffers: list[bytearray] = []
        self.chunk_spans: dict[int, list[float]] = {}  # index -> [receive start, receive end, verify start, stored] (perf_counter)
        # rawhttp for 206 bodies until a response needs the general client; a borrowed
        # session may carry auth headers, cookies or tracing, so all its requests go through it
        self.fast_path = self._own_session
        self.pumps: set[_SpanPump] = set()  # spans being received by pool threads
        self.stopping = False  # cancelled or failed: no new group commits (close() commits what is left)
        self._thread_buffers = threading.local()
        self._pumped_chunks: collections.deque[tuple[_SpanPump, ChunkEntry, ChunkIntegrityError | None]] = collections.deque()
        self._drain_scheduled = False
        self.commit_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-commit")
        self.uncommitted: list[int] = []  # written to the store, not yet durable and journaled
        self.commit_running = False
        self.last_commit = time.perf_counter()
        self.receive_wait_at_commit = 0.0  # stats.receive_wait_s at last_commit

    # ------------------------------------------------------------ start: header, pin, cache

    async def start(self) -> None:
        header = await self._read_header()
        self.data_offset = header.data_offset
        self.manifest: Manifest = header.manifest
        if self.pinned is not None and self.manifest.digest != self.pinned:
            raise DigestMismatchError(
                f"{self.source} serves a model with manifest digest {self.manifest.digest}, not the pinned {self.pinned}; refusing it"
            )
        self.stats.bytes_total = self.data_offset + self.manifest.data_size_bytes
        self.cache = ModelCache(self.cache_root, self.manifest.digest)

        def record() -> None:  # two small files written and fsynced: not on the event loop
            self.cache.write_header(header.raw)
            if self.origin is not None:
                ModelCache.write_ref(self.cache_root, self.source, self.manifest.digest)

        await asyncio.to_thread(record)
        await self.cache.acquire()
        done = self.cache.read_journal(len(self.manifest.chunks) + len(self.manifest.refinement_chunks))
        pending = [c for c in self.manifest.chunks if c.index not in done]
        await asyncio.to_thread(self.cache.open_store, self.manifest.store_size_bytes)
        self.stats.chunks_total = len(self.manifest.chunks)
        self.stats.chunks_cached = len(self.manifest.chunks) - len(pending)
        self.scheduler = ChunkScheduler(pending)
        self.bytes_to_download = sum(c.size_bytes for c in pending)
        self.remaining = [0] * len(self.manifest.layers)
        for chunk in pending:
            self.remaining[chunk.layer_index] += 1
        self.ready: list[asyncio.Future[None]] = [self.loop.create_future() for _ in self.manifest.layers]
        self.ready_s: list[float | None] = [None] * len(self.manifest.layers)
        for index, count in enumerate(self.remaining):
            if count == 0:
                self._set_ready(index)
        if not pending:
            if not self.cache.is_complete():
                await asyncio.to_thread(self.cache.mark_complete)
            self._finish()
        else:
            self._download_task = asyncio.create_task(self._download(), name=f"streamload download {self.manifest.digest[:12]}")
        logger.info("%s: %d of %d chunks cached, %d bytes to fetch", self.source, self.stats.chunks_cached, len(self.manifest.chunks), self.bytes_to_download)

    async def _read_header(self) -> Header:
        """Preamble and manifest from the file, the server, or (offline) the cache."""
        if not _is_url(self.source):
            path = Path(self.source)
            try:
                with io.open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    self.local_map = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
            except OSError as exc:
                raise FileNotFoundError(exc.errno, f"cannot open model file: {exc.strerror}", str(path)) from None
            raw = bytes(self.local_map[: min(size, header_size_needed(self.local_map[:PREAMBLE_SIZE_BYTES]) if size >= PREAMBLE_SIZE_BYTES else size)])
            return await parse_header(raw, size)
        if self.pinned is not None:  # a pinned model that is fully cached needs no network at all
            cached = await self._cached_header(self.pinned)
            if cached is not None:
                logger.info("using cached %s (pinned, complete): no network", self.pinned[:12])
                return cached
        if self.session is None:
            self.session = new_session()
        self.origin = HttpOrigin(self.session, self.source, self.retry)
        try:
            header = await self.origin.with_retries(lambda: fetch_header(self.origin), f"fetching the header of {self.source}")  # type: ignore[arg-type]
        except FetchError as exc:
            digest = ModelCache.read_ref(self.cache_root, self.source)
            cached = await self._cached_header(digest) if digest else None
            if cached is None:
                raise
            logger.warning("%s; using the cached copy %s", exc, cached.manifest.digest[:12])
            self.origin = None
            return cached
        self.stats.bytes_downloaded += len(header.raw)
        if not header.ranges_honoured:
            self.whole_file_only = True
            logger.info("%s ignores Range requests: downloading the whole file in order", self.source)
        return header

    async def _cached_header(self, digest: str) -> Header | None:
        """The header of a complete cached model (validated when it was fetched), or None."""
        cached = ModelCache(self.cache_root, digest)
        raw = cached.read_header() if cached.is_complete() else None
        return None if raw is None else await parse_header(raw, None)

    # ------------------------------------------------------------ readiness

    def _set_ready(self, index: int) -> None:
        if not self.ready[index].done():
            self.ready[index].set_result(None)
            self.ready_s[index] = time.perf_counter() - self.started

    def _finish(self) -> None:
        """Every chunk is verified and stored: the model is usable (durability follows, before close() returns)."""
        if self.complete.done():
            return
        self.stats.seconds = time.perf_counter() - self.started
        self.complete.set_result(None)
        self._report_progress(force=True)

    def _fail(self, exc: BaseException) -> None:
        for future in (*self.ready, self.complete):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: a failure nobody awaits is not "never retrieved"

    async def layer(self, index: int) -> Layer:
        if not 0 <= index < len(self.manifest.layers):
            raise IndexError(f"layer {index} does not exist; the model has {len(self.manifest.layers)} layers")
        if not self.ready[index].done():
            self.scheduler.prioritize(index)
            self._cut_spans_for_urgent()
        await asyncio.shield(self.ready[index])
        if index not in self._layers:
            self._layers[index] = self._make_layer(index)
        return self._layers[index]

    def _make_layer(self, index: int) -> Layer:
        store = self.cache.store_map if self.cache.store_map is not None else bytearray(0)
        tensors = {}
        for entry in self.manifest.tensors_of_layer(index):
            array = view_tensor(store, entry)
            array.flags.writeable = False
            tensors[entry.name] = array
        quant = {t.name: t.scales for t in self.manifest.tensors_of_layer(index) if t.quant is QuantScheme.INT8_ROW and t.scales}
        return Layer(index=index, name=self.manifest.layers[index].name, tensors=tensors, quant=quant)

    def tokenizer(self) -> Any:
        blob = self.manifest.tokenizer
        if blob is None:
            return None
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            if zstandard.frame_content_size(blob.data) != blob.raw_size_bytes:
                raise FormatError("the embedded tokenizer's size does not match the manifest")
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
            )
        )

    # ------------------------------------------------------------ the download

    async def _download(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self.tasks = tasks
                workers = 1 if self.origin is None or self.whole_file_only else self.connections
                for _ in range(workers):
                    tasks.create_task(self._local_worker() if self.origin is None else self._http_worker())
            self._finish()  # every layer is usable now; durability follows, before close() returns
            while self.uncommitted or self.commit_running:
                async with asyncio.TaskGroup() as tasks:
                    self.tasks = tasks
                    self._maybe_commit(force=True)
            await self.loop.run_in_executor(self.commit_pool, self.cache.mark_complete)
        except BaseException as exc:  # delivered to every waiter; close() awaits this task
            failure = _first_cause(exc)
            if isinstance(failure, (asyncio.CancelledError, KeyboardInterrupt, SystemExit)):
                self._fail(asyncio.CancelledError("the download was cancelled"))
                raise
            if self.complete.done():  # the data is all here and usable; only its bookkeeping failed
                logger.warning("the model is complete but could not be recorded in the cache (%s); it will be checked again next time", failure)
            self._fail(failure)

    async def _local_worker(self) -> None:
        assert self.local_map is not None
        while not self.scheduler.finished:
            span = self.scheduler.take_span(1)  # one chunk at a time: a layer request jumps the queue at once
            if not span:
                await self.scheduler.wait_for_change()
                continue
            chunk = span[0]
            start = self.data_offset + chunk.offset
            await self._submit(chunk, self.local_map[start : start + chunk.size_bytes])

    def _span_limit_bytes(self) -> int:
        if self.connections == 1:
            return 1 << 62  # one request for the whole contiguous run; cut short only to jump the queue
        return max(self.manifest.chunk_size_bytes, min(64 << 20, self.bytes_to_download // (4 * self.connections)))

    async def _http_worker(self) -> None:
        backoff = Backoff(self.retry, f"downloading {self.source}")
        while not self.scheduler.finished:
            span = self.scheduler.take_all() if self.whole_file_only else self.scheduler.take_span(self._span_limit_bytes())
            if not span:
                await self.scheduler.wait_for_change()
                continue
            arrived: set[int] = set()
            try:
                await self._fetch_span(span, arrived)
                backoff.failures = 0
            except (RetryableError, StalledError) as exc:
                self.stats.retries += 1
                await backoff.wait(exc, progressed=bool(arrived))  # chunks that did arrive count as progress

    async def _fetch_span(self, span: list[ChunkEntry], arrived: set[int]) -> None:
        """Fetch contiguous chunks with one request into ``arrived``; whatever does not arrive goes back to the queue."""
        assert self.origin is not None
        start, end = self.data_offset + span[0].offset, self.data_offset + span[-1].end
        try:
            if self.fast_path and not self.whole_file_only:
                stream = await self._open_raw(start, end)
                if stream is not None:
                    await self._pump_span(span, stream, arrived)
                    return
            reply = await self.origin.open_range(0) if self.whole_file_only else await self.origin.open_range(start, end)
            try:
                if reply.kind is BodyKind.WHOLE:
                    if not self.whole_file_only:
                        logger.info("%s ignored a Range request: switching to whole-file downloads", self.source)
                        self.whole_file_only = True
                    await self._consume_whole_file(reply, span, arrived)
                    return
                body = BodyReader(reply.response, self.source)
                await self._receive_chunks(span, arrived, lambda target: self.origin.read_into(body, target))  # type: ignore[union-attr]
            finally:
                if len(arrived) == len(span) and reply.kind is BodyKind.PARTIAL:
                    reply.response.release()
                else:
                    reply.response.close()
        finally:
            self.scheduler.give_back([c for c in span if c.index not in arrived])

    async def _open_raw(self, start: int, end: int) -> RawRange | None:
        """The zero-copy ranged GET, or None (and the fast path off for good) when this server needs the general client."""
        assert self.origin is not None
        try:
            return await RawRange.open(
                self.source, start, end, if_range=self.origin.etag, connect_timeout_s=self.retry.connect_timeout_s, read_timeout_s=self.retry.stall_timeout_s
            )
        except (TransportUnsupported, ssl.SSLError) as exc:  # TLS the fast path cannot settle: aiohttp decides (and words any error)
            logger.info("%s: using the general HTTP client (%s)", self.source, exc)
            self.fast_path = False
            return None
        except TransportStatus as exc:
            raise http_status_error(self.source, exc.status, "", exc.retry_after) from None
        except TimeoutError:
            raise StalledError(f"{self.source}: no response within {self.retry.stall_timeout_s:.0f} s") from None
        except OSError as exc:
            raise RetryableError(f"cannot reach {self.source}: {exc}") from None

    async def _pump_span(self, span: list[ChunkEntry], stream: RawRange, arrived: set[int]) -> None:
        """Receive, verify, decompress and store a span on pool threads (see ``_SpanPump``); raises its first failure."""
        pump = _SpanPump(span, stream)
        self.pumps.add(pump)
        threads = min(len(span), -(-self.verify_threads // self.connections))
        jobs = asyncio.gather(*(self.loop.run_in_executor(self.pool, self._pump_chunks, pump) for _ in range(threads)), return_exceptions=True)
        try:
            await asyncio.shield(jobs)
        except asyncio.CancelledError:
            self.stopping = True
            pump.stop()
            stream.abort()  # a thread blocked in recv returns at once
            await asyncio.wait([jobs])  # no thread may touch the store or the socket after this returns
            raise
        finally:
            self.pumps.discard(pump)
            stream.close()
            arrived.update(chunk.index for chunk in span[: pump.received])
        if pump.error is not None:
            raise pump.error

    def _pump_chunks(self, pump: _SpanPump) -> None:
        """One pool thread's share of a span: take the next chunk, receive it, let go of the socket, process it."""
        try:
            while True:
                with pump.lock:
                    if pump.stopped or pump.received == len(pump.span):
                        return
                    chunk = pump.span[pump.received]
                    view = self._thread_buffer(chunk.size_bytes)
                    waiting = time.perf_counter()
                    try:
                        with body_errors(self.source, self.retry):
                            pump.stream.read_into(view)
                    except (RetryableError, StalledError) as exc:
                        pump.stop(exc)
                        return
                    pump.received += 1
                received = time.perf_counter()
                self.stats.receive_wait_s += received - waiting  # float += under the GIL: a lost update only blurs a statistic
                self.chunk_spans[chunk.index] = [waiting, received, 0.0, 0.0]
                try:
                    self._verify_and_store(chunk, view)
                except ChunkIntegrityError as exc:
                    self._post_pumped(pump, chunk, exc)
                    continue
                self._post_pumped(pump, chunk, None)
        except BaseException as exc:  # a chunk that decodes wrong after its hash matched, a full disk, a bug: fatal
            pump.stop(exc)

    def _thread_decompressor(self) -> zstandard.ZstdDecompressor:
        """This thread's zstd context (contexts are not thread-safe, and one per chunk is setup thrown away)."""
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._thread_buffers, "decompressor", None)
        if decompressor is None:
            decompressor = self._thread_buffers.decompressor = zstandard.ZstdDecompressor()
        return decompressor

    def _thread_buffer(self, size_bytes: int) -> memoryview:
        """This thread's receive buffer (allocated once, so its pages stay warm)."""
        buffer: bytearray | None = getattr(self._thread_buffers, "buffer", None)
        if buffer is None or len(buffer) < size_bytes:
            buffer = self._thread_buffers.buffer = bytearray(max(size_bytes, self.manifest.chunk_size_bytes + (self.manifest.chunk_size_bytes >> 3)))
        return memoryview(buffer)[:size_bytes]

    def _post_pumped(self, pump: _SpanPump, chunk: ChunkEntry, failure: ChunkIntegrityError | None) -> None:
        """From a pump thread: queue a finished chunk for the event loop, waking it only when no wake-up is pending."""
        self._pumped_chunks.append((pump, chunk, failure))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is shutting down, nothing to tell
                self.loop.call_soon_threadsafe(self._drain_pumped)

    def _drain_pumped(self) -> None:
        """On the event loop: account for every chunk the pump threads finished since the last wake-up.

        The flag is cleared before draining, so a chunk queued after the last pop schedules
        its own wake-up; a pump's chunks are all drained before its thread's job completes.
        """
        self._drain_scheduled = False
        while self._pumped_chunks:
            self._pumped(*self._pumped_chunks.popleft())

    def _pumped(self, pump: _SpanPump, chunk: ChunkEntry, failure: ChunkIntegrityError | None) -> None:
        """On the event loop: a pump thread finished a chunk (stored, or failed its hash)."""
        self.stats.bytes_downloaded += chunk.size_bytes
        if failure is None:
            self._chunk_stored(chunk)
            return
        fatal = self._integrity_failed(chunk, failure)
        if fatal is not None:
            pump.stop(fatal)
        else:
            self._cut_spans_for_urgent()

    def _cut_spans_for_urgent(self) -> None:
        """A layer someone waits for has chunks nobody is fetching: end running spans at their next chunk."""
        if self.pumps and self.scheduler.urgent_waiting():
            for pump in self.pumps:
                pump.stop()

    async def _receive_chunks(self, span: list[ChunkEntry], arrived: set[int], read: Callable[[memoryview], Awaitable[None]]) -> None:
        """Read the span's chunks in order into recycled buffers and hand each to the pool."""
        for chunk in span:
            buffer = await self._take_buffer(chunk.size_bytes)
            waiting = time.perf_counter()
            try:
                await read(buffer)
            except BaseException:
                self._return_buffer(buffer)
                raise
            received = time.perf_counter()
            self.stats.receive_wait_s += received - waiting
            self.chunk_spans[chunk.index] = [waiting, received, 0.0, 0.0]
            self.stats.bytes_downloaded += chunk.size_bytes
            arrived.add(chunk.index)
            self.tasks.create_task(self._process(chunk, buffer))
            if len(arrived) < len(span) and self.scheduler.urgent_waiting():
                break  # someone asked for a layer outside this span: let it go first

    async def _consume_whole_file(self, reply: RangeResponse, wanted: list[ChunkEntry], arrived: set[int]) -> None:
        """Read a whole-file body front to back, keeping the wanted chunks and dropping the rest."""
        assert self.origin is not None
        position = 0
        for chunk in sorted(wanted, key=lambda c: c.offset):
            start = self.data_offset + chunk.offset
            while position < start:  # bytes we already have (header, cached chunks): read and drop
                step = min(start - position, 1 << 20)
                await self.origin.read_exactly(reply.response, step)
                self.stats.bytes_downloaded += step
                position += step
            data = await self.origin.read_exactly(reply.response, chunk.size_bytes)
            self.stats.bytes_downloaded += chunk.size_bytes
            position += chunk.size_bytes
            arrived.add(chunk.index)
            await self._submit(chunk, data)

    # ------------------------------------------------------------ verify, decompress, store

    async def _submit(self, chunk: ChunkEntry, data: bytes | memoryview) -> None:
        """Hand a received chunk to the thread pool (waiting while too many are queued)."""
        await self.in_flight.acquire()
        self.tasks.create_task(self._process(chunk, data))

    async def _take_buffer(self, size_bytes: int) -> memoryview:
        """A reusable receive buffer (at most in_flight of them exist: bounded memory, no fresh page faults)."""
        await self.in_flight.acquire()
        for i, buffer in enumerate(self.free_buffers):
            if len(buffer) >= size_bytes:
                del self.free_buffers[i]
                return memoryview(buffer)[:size_bytes]
        return memoryview(bytearray(max(size_bytes, self.manifest.chunk_size_bytes + (self.manifest.chunk_size_bytes >> 3))))[:size_bytes]

    def _return_buffer(self, view: memoryview) -> None:
        buffer = view.obj
        view.release()
        if isinstance(buffer, bytearray):
            self.free_buffers.append(buffer)
        self.in_flight.release()

    def _maybe_commit(self, force: bool = False) -> None:
        """Start a group commit when one is due (see COMMIT_INTERVAL_S) and none is running."""
        if self.commit_running or not self.uncommitted or self.stopping:
            return
        if force or commit_due(time.perf_counter() - self.last_commit, self.stats.receive_wait_s - self.receive_wait_at_commit):
            try:
                self.tasks.create_task(self._commit())
            except RuntimeError:  # the task group is shutting down (a failure elsewhere): close() commits what is left
                self.stopping = True
                return
            self.commit_running = True

    async def _commit(self) -> None:
        batch, self.uncommitted = self.uncommitted, []
        started = time.perf_counter()
        try:
            await self.loop.run_in_executor(self.commit_pool, self.cache.commit_chunks, batch)
        finally:
            self.commit_running = False
            self.last_commit = time.perf_counter()
            self.receive_wait_at_commit = self.stats.receive_wait_s
            self.stats.commit_s += self.last_commit - started
        self._maybe_commit()

    async def _process(self, chunk: ChunkEntry, data: bytes | memoryview) -> None:
        owned = isinstance(data, memoryview) and isinstance(data.obj, bytearray)  # a receive buffer to recycle
        try:
            await self.loop.run_in_executor(self.pool, self._verify_and_store, chunk, data)
        except ChunkIntegrityError as exc:
            fatal = self._integrity_failed(chunk, exc)
            if fatal is not None:
                raise fatal from exc
            return
        finally:
            if owned:
                self._return_buffer(data)  # type: ignore[arg-type]
            else:
                self.in_flight.release()
        self._chunk_stored(chunk)

    def _integrity_failed(self, chunk: ChunkEntry, exc: ChunkIntegrityError) -> ChunkIntegrityError | None:
        """A chunk failed its hash: queue it again, or (too many attempts, or a local file) the error that ends the download."""
        self.stats.integrity_failures += 1
        attempts = self._integrity_attempts.get(chunk.index, 0) + 1
        self._integrity_attempts[chunk.index] = attempts
        if self.origin is None or attempts >= MAX_INTEGRITY_ATTEMPTS:
            where = "the file" if self.origin is None else f"{attempts} downloads from {self.source}"
            fatal = ChunkIntegrityError(
                f"chunk {chunk.index} of layer {chunk.layer_index} failed its sha256 check in {where}; "
                "the source is corrupt: nothing from it was used. Re-convert or re-upload the model.",
                layer_index=chunk.layer_index,
                chunk_index=chunk.index,
            )
            fatal.__cause__ = exc
            return fatal
        logger.warning("%s; fetching it again", exc)
        self.scheduler.give_back([chunk])
        return None

    def _chunk_stored(self, chunk: ChunkEntry) -> None:
        """A chunk is verified and in the store: journal it (group commit), and signal its layer when it was the last."""
        self.stats.chunks_fetched += 1
        self.uncommitted.append(chunk.index)
        self._maybe_commit()
        self.scheduler.done(chunk)
        self.remaining[chunk.layer_index] -= 1
        if self.remaining[chunk.layer_index] == 0:
            self._set_ready(chunk.layer_index)
        if self.scheduler.finished:
            self._finish()  # now, not when a group commit still running in the task group ends
        else:
            self._report_progress()

    def _verify_and_store(self, chunk: ChunkEntry, data: bytes | memoryview) -> None:
        """Runs on a pool thread: nothing unverified is ever decompressed or written."""
        started = time.perf_counter()
        verify_chunk(chunk, data)
        verified = time.perf_counter()
        raw = decompress_chunk(chunk, data, decompressor=self._thread_decompressor())
        decompressed = time.perf_counter()
        self.cache.write_chunk(chunk.raw_offset, raw)
        stored = time.perf_counter()
        self.stats.verify_s += verified - started  # float += under the GIL: a lost update only blurs a statistic
        self.stats.decompress_s += decompressed - verified
        self.stats.store_s += stored - decompressed
        span = self.chunk_spans.setdefault(chunk.index, [started, started, 0.0, 0.0])
        span[2], span[3] = started, stored

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self._download_task is not None:
            if not self.complete.done() or self.complete.exception() is not None:
                self._download_task.cancel()  # unfinished: stop; what is committed stays for the next run
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await self._download_task  # finished: the last group commit completes first
        self.pool.shutdown(wait=True)
        if self.uncommitted and hasattr(self, "cache"):  # stopped early or failed: keep what is verified and written
            batch, self.uncommitted = self.uncommitted, []
            try:
                await self.loop.run_in_executor(self.commit_pool, self.cache.commit_chunks, batch)
            except StreamloadError as exc:
                logger.warning("could not save %d downloaded chunks to the cache: %s", len(batch), exc)
        self.commit_pool.shutdown(wait=True)
        if self._own_session and self.session is not None:
            await self.session.close()
        if hasattr(self, "cache"):
            self._layers.clear()
            self.cache.close()
        if self.local_map is not None:
            with contextlib.suppress(BufferError):
                self.local_map.release()


@contextlib.asynccontextmanager
async def open(  # noqa: A001 - the library's verb, like builtins.open
    source: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    digest: str | None = None,
    connections: int = 1,
    session: aiohttp.ClientSession | None = None,
    progress: Callable[[Progress], None] | None = None,
    retry: RetryPolicy | None = None,
    verify_threads: int | None = None,
) -> AsyncIterator[Model]:
    """Open a model from an http(s) URL or a local .slm path; layers stream in while you use it.

    Args:
        source: URL (optionally ``#sha256=DIGEST``) or path of a .slm file.
        cache_dir: where verified layers are kept (default ``$STREAMLOAD_CACHE`` or ``~/.cache/streamload``).
        digest: refuse any model whose manifest digest differs (also lets a complete cache work offline).
        connections: parallel ranged requests (1 keeps layers strictly in order: best time to layer 0).
        session: an ``aiohttp.ClientSession`` to borrow (default: one owned by this call).
        progress: called with a ``Progress`` at most every 0.1 s and at the end.
        retry: retry and timeout policy for the network.
        verify_threads: threads that receive, hash, decompress and store chunks (default:
            cores + 1, at most 8: one thread waits on the socket while the others compute).

    Raises:
        FetchError, DigestMismatchError, FormatError, CacheError: before the model is returned;
        later failures surface from ``layer()`` and ``wait_complete()``.

    Example:
        >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:   # doctest: +SKIP
        ...     async for index, layer in model.layers():
        ...         print(index, layer.name, list(layer.tensors)[:2])
    """
    loader = _Loader(
        os.fspath(source),
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        digest=digest,
        connections=connections,
        session=session,
        progress=progress,
        retry=retry or RetryPolicy(),
        verify_threads=verify_threads or min(8, (os.cpu_count() or 1) + 1),
    )
    try:
        await loader.start()
        yield Model(loader)
    finally:
        await loader.close()


async def read_remote_header(url: str, *, session: aiohttp.ClientSession | None = None, retry: RetryPolicy | None = None) -> tuple[Manifest, int]:
    """The manifest of a model URL and the file's size, with one or two small requests (no data)."""
    own = session is None
    session = session or new_session()
    try:
        origin = HttpOrigin(session, url, retry or RetryPolicy())
        header = await origin.with_retries(lambda: fetch_header(origin), f"fetching the header of {url}")
        return header.manifest, header.data_offset + header.manifest.data_size_bytes
    finally:
        if own:
            await session.close()
