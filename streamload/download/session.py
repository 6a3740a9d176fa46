"""One model's download session: header -> cache -> chunk index -> download, top to bottom; hands out layers and rows.

``start`` reads the header (``origin.py``: from the source with one open-ended request from byte 0 whose body goes
on into the data, or from the cache when the model is pinned and complete, or offline), opens the cache, reads what
its journal holds (``CachedChunks``, over the manifest's ``ChunkIndex``) and hands what it lacks to a ``Download``
(``model_download.py``), the one owner of the scheduler and ``Readiness``. ``layer``, ``coarse_layer`` and ``rows``
ask it for what is not here yet; a cached chunk is checked against its journaled digest the first time the opened model
uses it (a damaged one is fetched again). Event loop; file work on worker threads.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache.model_cache import ModelCache
from ..cache.refs import write_ref
from ..errors import CacheError, DigestMismatchError, FetchError, StreamloadError
from ..formats import Manifest, QuantScheme, view_tensor
from ..formats.constants import LayerKind
from ..layer import Layer, distinct_rows, map_layer
from ..stats import DownloadStats, Progress
from ..tokenizer import load_tokenizer
from ..transport.httputil import RetryPolicy
from ..transport.source import Source, SpanReader
from .cached_chunks import CachedChunks
from .chunk_index import ChunkIndex
from .header import Header
from .model_download import Download, DownloadSettings
from .origin import Origin, split_pin
from .probes import HeaderProbes, check_mirrors

if TYPE_CHECKING:
    import aiohttp

    from .delta_stream import DeltaStream

logger = logging.getLogger(__name__)

__all__ = ["DownloadSession"]


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
        self.connections = max(1, connections)
        self.retry = retry
        self.progress_callback = progress
        self.verify_threads = max(1, verify_threads)
        self.stats = DownloadStats()
        self.started = time.perf_counter()
        self.origin = Origin(self.url, self.pinned, cache_root=cache_root, retry=retry, session=session, headers=headers, stats=self.stats)
        self.probes = HeaderProbes(self.url, self.mirror_urls, retry, session, headers)
        # set by start(); close() copes with any of them missing
        self.header: Header | None = None  # the model's preamble and manifest
        self.cache: ModelCache | None = None
        self.chunk_index: ChunkIndex | None = None  # what the manifest's chunk table says about the layers
        self.cached: CachedChunks | None = None  # what the cache held when opened, checked once per opened model
        self.download: Download | None = None  # the owner of the scheduler and readiness
        self._header_stream: SpanReader | None = None  # the header's request, going on into the data (the download takes it)
        self._temp_root: Path | None = None  # a private cache for a local file when the cache directory is not writable
        self.needed_chunks: dict[int, int] = {}  # index -> size of the chunks the layers and rows handed out depended on
        self._layers: dict[int, Layer] = {}
        self._tokenizer: Any = None

    @property
    def source(self) -> Source | None:
        """Where the bytes come from (None while the header came from the cache and nothing is missing)."""
        return self.origin.source

    @property
    def manifest(self) -> Manifest:
        assert self.header is not None
        return self.header.manifest

    @property
    def data_offset(self) -> int:
        assert self.header is not None
        return self.header.data_offset

    def chunk_times(self) -> dict[int, tuple[float, float, float, float]]:
        """Chunk index -> (receive start, receive end, verify start, stored) (perf_counter) of the chunks fetched so far."""
        return self.download.chunk_times() if self.download is not None else {}

    @property
    def offline(self) -> FetchError | None:
        """Why the source could not be reached when the header came from the cache (None: it was reached)."""
        return self.origin.offline

    @property
    def complete(self) -> asyncio.Future[None]:
        assert self.download is not None
        return self.download.complete

    async def wait_complete(self) -> None:
        """Every chunk in the cache, and each one that came from it checked against its journaled digest (damaged ones
        fetched again; with no source, a CacheError): what is declared complete has been checked."""
        while True:
            assert self.download is not None and self.chunk_index is not None
            await asyncio.shield(self.download.complete)
            if await self._check_cached(np.arange(len(self.chunk_index.table))):
                return

    @property
    def ready_s(self) -> list[float | None]:
        return self.download.ready_s if self.download is not None else []

    @property
    def coarse_ready_s(self) -> list[float | None]:
        return self.download.coarse_ready_s if self.download is not None else []

    # ------------------------------------------------------------ start: header, pin, cache, schedule

    async def start(self) -> None:
        """Header, cache, what the journal holds (and, for an update, what other cached models and a delta file give);
        then the download fetches the rest, or the model is complete at once."""
        header = await self._read_header()
        cache = await self._open_cache(header)
        index, cached, pending = await self._read_journal(cache)
        remote = self.source is not None and self.source.remote
        delta = await self._reuse_cached(header, cache, cached, pending) if remote and pending.any() else None
        if not pending.any():
            self._close_header_stream()  # nothing to read from it
        stream, self._header_stream = self._header_stream, None  # the download's now: its first worker reads on from it
        self.download = download = Download(
            DownloadSettings(self.url, self.mirror_urls, self.retry, self.connections, self.verify_threads),
            manifest=header.manifest,
            data_offset=header.data_offset,
            index=index,
            cache=cache,
            pending=pending,
            stats=self.stats,
            probes=self.probes,
            progress=self.progress_callback,
            started=self.started,
            header_stream=stream,
            delta=delta,
        )
        if not pending.any():
            await download.finish_cached()
        else:
            await self._fetch_missing()
            download.start_delta()
        logger.info(
            "%s: %d of %d chunks cached, %d bytes to fetch", self.url, self.stats.chunks_cached, len(pending), download.bytes_to_download
        )

    async def _read_header(self) -> Header:
        """The model's header (from the cache when pinned and complete, else from the source), checked against the pin."""
        header = await self.origin.cached_pinned_header()
        if header is None:
            self.probes.start()  # the mirrors' headers come beside the primary's: they are ready when the data starts
            header = await self.origin.read_header()
        self.header = header
        self._header_stream = header.stream
        if self.pinned is not None and header.manifest.digest != self.pinned:
            raise DigestMismatchError(
                f"{self.url} serves a model with manifest digest {header.manifest.digest}, not the pinned {self.pinned}; refusing it"
            )
        self.stats.bytes_total = header.data_offset + header.manifest.data_size_bytes
        return header

    async def _open_cache(self, header: Header) -> ModelCache:
        """The model's cache (a private one for a local file when the cache directory is not writable), its header and
        ref recorded, its lock held."""
        manifest, root = header.manifest, self.origin.cache_root  # the origin's: it reads cached headers there too
        if self.source is not None and not self.source.remote and not await asyncio.to_thread(_writable, root):
            # a local file needs no cache to outlive the run: decompress into a private one, removed at close
            self._temp_root = Path(tempfile.mkdtemp(prefix="streamload-run-"))
            logger.warning("the cache directory %s is not writable; running %s from a temporary copy", root, self.url)
            self.origin.use_cache_root(root := self._temp_root)
        self.cache = cache = ModelCache(root, manifest.digest)
        remote = self.source is not None and self.source.remote

        def record() -> None:  # two small files written and fsynced: not on the event loop
            cache.write_header(header.raw)
            if remote:
                # a 304 read no header, so the source has no ETag of its own: the one revalidated stays in the ref
                etag = (self.source.etag if self.source is not None else None) or self.origin.revalidated_etag
                write_ref(root, self.url, manifest.digest, etag)
            elif self.source is not None:  # a local file: `streamload run NAME` finds it again by its cached name
                write_ref(root, str(Path(self.url).resolve()), manifest.digest)

        await asyncio.to_thread(record)
        await cache.acquire()
        return cache

    async def _read_journal(self, cache: ModelCache) -> tuple[ChunkIndex, CachedChunks, np.ndarray]:
        """The chunk index, the chunks the cache holds (those under refinements still to fetch checked now), and per
        position whether it is pending."""
        manifest = self.manifest
        journaled = cache.read_journal(len(manifest.chunk_table) + len(manifest.refinement_chunks))
        store_size = await asyncio.to_thread(cache.open_store, manifest.store_size_bytes)
        self.chunk_index = index = ChunkIndex.build(manifest)
        self.cached = cached = CachedChunks(cache, index, journaled, store_size, manifest.store_size_bytes)
        if index.plan.requires and cached.journaled:
            damaged = await cached.check_under_pending_refinements()
            if damaged:
                logger.warning("%d cached chunks under refinements still to fetch differ from what was verified; fetching them", damaged)
        pending = cached.pending()
        self.stats.chunks_total = len(pending)
        self.stats.chunks_cached = len(pending) - int(pending.sum())
        return index, cached, pending

    async def _reuse_cached(self, header: Header, cache: ModelCache, cached: CachedChunks, pending: np.ndarray) -> DeltaStream | None:
        """An update: chunks other cached models hold are copied, not downloaded; the rest from a delta file against a
        cached version, where the manifest lists one (its stream). ``pending`` loses what was copied."""
        from .updates import copy_shared, open_update_delta  # a remote download's modules: a local run's cold start skips them

        copied, found = await copy_shared(self.origin, header, cache, cached, pending)
        pending[copied] = False  # the session's own array: copied chunks are cached now
        if len(pending) and (not pending[0] or found is not None):  # the header's request would bring what is here
            self._close_header_stream()
        return None if found is None else await open_update_delta(found, self.origin, header, cache, cached, pending)

    def _close_header_stream(self) -> None:
        if self._header_stream is not None:
            self._header_stream.close()
            self._header_stream = None

    async def _fetch_missing(self) -> None:
        """Have the download fetch what is pending (once; again after a damaged cached chunk is reopened): from the
        source, reached again when the header came from the cache; offline, the layers the cache lacks fail."""
        download, cached = self.download, self.cached
        assert download is not None and cached is not None
        if download.running:
            download.start()  # the running download fetches what was reopened, even while its last commits run
            return
        if self.origin.source is None and self.origin.offline is not None:  # offline from a partial copy: use what it holds
            download.fail_missing(self.origin.offline)
            return
        download.start(
            self.origin.source or await self.origin.reconnect(self.manifest.digest, download.what_is_missing(cached.store_cut_short))
        )

    # ------------------------------------------------------------ what the runtime asks for

    async def layer(self, index: int) -> Layer:
        if not 0 <= index < len(self.manifest.layers):
            raise IndexError(f"layer {index} does not exist; the model has {len(self.manifest.layers)} layers")
        download, chunk_index, cached = self.download, self.chunk_index, self.cached
        assert download is not None and chunk_index is not None and cached is not None
        for scales_layer in chunk_index.scales_layers[index]:  # a row table's scales live in an execution step
            await self.layer(scales_layer)
        chunks = chunk_index.layer_chunks(index)
        while True:
            await download.wait_for_layer(index)
            if index in cached.checked_layers or await self._check_cached(chunks):
                break
        cached.mark_checked(index)
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
        download, chunk_index = self.download, self.chunk_index
        assert download is not None and chunk_index is not None
        if not len(chunk_index.plan.layer_refinements[index]):
            return await self.layer(index)
        for scales_layer in chunk_index.scales_layers[index]:
            await self.layer(scales_layer)
        while True:
            await download.wait_for_layer(index, coarse=True)
            if await self._check_cached(chunk_index.layer_positions[index]):
                break
        self._need(chunk_index.layer_positions[index])
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
            download, chunk_index, cached = self.download, self.chunk_index, self.cached
            assert download is not None and chunk_index is not None and cached is not None
            row_bytes = entry.shape[1] * entry.dtype.size_bytes
            positions = chunk_index.positions_of_rows(entry.layer_index, entry.raw_offset, row_bytes, distinct_rows(ids))
            self._need(positions)
            while entry.layer_index not in cached.checked_layers:
                await download.wait_for_chunks(positions)  # demanded (no cut: extra requests fetch them) and waited for
                if await self._check_cached(positions):
                    break
        if scales_entry is not None:
            await self.layer(scales_entry.layer_index)
        assert self.cache is not None
        values = view_tensor(self.cache.store_map, entry)[ids]  # a copy: fancy indexing
        scales = None if scales_entry is None else view_tensor(self.cache.store_map, scales_entry)[ids]
        return values, scales

    def _need(self, positions: np.ndarray) -> None:
        """Count these chunks as ones the layers and rows handed out depended on."""
        assert self.chunk_index is not None
        table = self.chunk_index.table
        self.needed_chunks.update(zip(table.index[positions].tolist(), table.size[positions].tolist(), strict=True))

    async def _check_cached(self, positions: np.ndarray) -> bool:
        """Check the given chunks (positions) that came from the cache against their journaled digests (once per opened model).

        True when all match. Damaged ones are fetched again (False: wait for them), or,
        with no source to fetch them from, a CacheError naming their layer.
        """
        assert self.cached is not None and self.download is not None
        reopened = await self.cached.recheck(positions)
        if not reopened:
            return True
        layers = sorted({c.layer_index for c in reopened})
        names = ", ".join(f"{i} ({self.manifest.layers[i].name})" for i in layers)
        logger.warning("layer %s: %d cached chunks differ from what was verified; fetching them again", names, len(reopened))
        self.cached.forget(self.download.reopen(reopened))
        try:
            await self._fetch_missing()
        except StreamloadError as exc:
            failure = CacheError(
                f"layer {names} of the cached model {self.manifest.digest[:12]} is damaged and cannot be fetched again: {exc}"
            )
            self.download.fail_layers(layers, failure)
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
        if self.download is not None:
            await self.download.stop()
        self._close_header_stream()  # no download took it (starting one failed first)
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
