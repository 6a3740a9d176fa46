"""The public face: ``open`` a model from a URL or a file, and the ``Model`` whose layers arrive while it streams."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .cache.files import default_cache_dir
from .download.header import read_header_with_retries
from .download.model_download import default_verify_threads
from .download.origin import is_url
from .download.session import DownloadSession
from .errors import FetchError
from .formats import Manifest
from .layer import Layer
from .stats import DownloadStats, LayerTimes, Progress
from .transport.httputil import RetryPolicy, check_headers, check_session

if TYPE_CHECKING:
    import aiohttp


class ModelBase:
    """What an open model answers without waiting, the same for ``Model`` (async) and ``SyncModel`` (blocking): its
    manifest, cache, statistics and timings. Neither face is the other's subclass: a blocking ``layer`` is not an
    async one."""

    def __init__(self, session: DownloadSession) -> None:
        self._session = session

    @property
    def manifest(self) -> Manifest:
        return self._session.manifest

    @property
    def waits_on_own_loop(self) -> bool:
        """Whether this model's waits run on an event loop of its own (a ``SyncModel``, whose calls block) rather than the
        caller's: ``runtime.run`` awaits layers on the running loop, so it takes only a model whose answer is False."""
        return False

    @property
    def config(self) -> Mapping[str, Any]:
        return self._session.manifest.config

    @property
    def digest(self) -> str:
        return self._session.manifest.digest

    @property
    def path(self) -> Path:
        """The model's cache directory."""
        assert self._session.cache is not None
        return self._session.cache.directory

    @property
    def store_path(self) -> Path:
        """The model's layer store in the cache (FORMAT.md's layer store): where a run under a memory budget reads its
        weights from, apart from the memory map."""
        assert self._session.cache is not None
        return self._session.cache.store_path

    def drop_cached_pages(self, layer_index: int | None = None) -> None:
        """Unmap the store's pages this process touched (of one layer, or all) and let the kernel drop them from the page
        cache (best effort): a run under a memory budget does this for what it will not read again soon."""
        if self._session.cache is None:
            return
        if layer_index is None:
            self._session.cache.drop_store_pages()
        else:
            layer = self.manifest.layers[layer_index]
            self._session.cache.drop_store_pages(layer.raw_offset, layer.raw_size_bytes)

    @property
    def stats(self) -> DownloadStats:
        return self._session.stats

    @property
    def opened_at(self) -> float:
        """``time.perf_counter()`` when the model was opened: layer_ready_s counts from here."""
        return self._session.started

    @property
    def layer_ready_s(self) -> list[float | None]:
        """Seconds from open until each layer was ready (None: not yet)."""
        return list(self._session.ready_s)

    @property
    def layer_coarse_ready_s(self) -> list[float | None]:
        """Seconds from open until each layer was usable at coarse precision (``coarse_layer``; None: not yet)."""
        return list(self._session.coarse_ready_s)

    @property
    def offline_reason(self) -> FetchError | None:
        """Why the source could not be reached when the model was opened from the cache alone (None: it was reached,
        or was not needed); the layers the cache lacks then fail."""
        return self._session.offline

    @property
    def progressive(self) -> bool:
        """Some layers arrive coarse first and exact after their refinements (``convert --progressive``)."""
        return self.manifest.progressive

    @property
    def tokenizer(self) -> Any:
        """The embedded tokenizer as a ``tokenizers.Tokenizer`` (None when the model has none)."""
        return self._session.tokenizer()

    def layer_times(self) -> list[LayerTimes]:
        """Per layer, when its chunks were received and when they were verified+decompressed+stored
        (``time.perf_counter()`` values; None for layers that came from the cache)."""
        chunk_times = self._session.chunk_times()
        times_by_layer: dict[int, list[tuple[float, ...]]] = {}
        refined_by_layer: dict[int, list[tuple[float, ...]]] = {}
        for chunk in self.manifest.file_order_chunks():  # pass 0, and a progressive layer's refinements apart
            if chunk.index in chunk_times:
                (refined_by_layer if chunk.pass_index else times_by_layer).setdefault(chunk.layer_index, []).append(
                    chunk_times[chunk.index]
                )
        result = []
        for layer in self.manifest.layers:
            times = times_by_layer.get(layer.index)
            refined = refined_by_layer.get(layer.index)
            refinement = (min(t[0] for t in refined), max(t[3] for t in refined)) if refined else None
            if not times:
                result.append(LayerTimes(layer.index, layer.name, None, None, refinement))
                continue
            download = (min(t[0] for t in times), max(t[1] for t in times))
            decompress = (min(t[2] for t in times), max(t[3] for t in times))
            result.append(LayerTimes(layer.index, layer.name, download, decompress, refinement))
        return result

    def layer_spans(self) -> list[LayerTimes]:
        """The old name of ``layer_times``, kept for one release (docs/api.md, "Renamed")."""
        return self.layer_times()

    @property
    def header_bytes(self) -> int:
        """Bytes before the data region: preamble, manifest and padding."""
        return self._session.data_offset

    @property
    def bytes_needed(self) -> int:
        """Bytes of the file that what was handed out so far (layers, rows) depended on: header + their chunks."""
        return self.header_bytes + sum(self._session.needed_chunks.values())

    @property
    def is_complete(self) -> bool:
        """Every chunk is verified and in the cache."""
        complete = self._session.complete
        return complete.done() and complete.exception() is None


class Model(ModelBase):
    """An open model. Layers become available in execution order while the download runs.

    Get one with ``streamload.open``; see its example.
    """

    def __init__(self, session: DownloadSession) -> None:
        super().__init__(session)
        self.runtime_state: Any = None  # the runtime's own per-model state (float32 weight copies, a validated config)

    async def layer(self, index: int) -> Layer:
        """Wait for layer ``index`` (moving it to the front of the queue) and return its tensors.

        Raises:
            IndexError: no such layer.
            StreamloadError: the download failed (ChunkIntegrityError, FetchError, CacheError...).
        """
        return await self._session.layer(index)

    async def coarse_layer(self, index: int) -> Layer:
        """Wait for layer ``index`` at coarse precision: as soon as the coarse levels of its progressive tensors are
        here, before their refinements (those tensors are copies at coarse levels; a layer with none is ``layer``).

        Raises: as ``layer``.
        """
        return await self._session.coarse_layer(index)

    def coarse(self) -> CoarseModel:
        """This model as the runtime sees it for a preview: ``layer`` is ``coarse_layer``, the rest is this model."""
        return CoarseModel(self)

    async def rows(self, name: str, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``ids`` of a 2-D tensor (an embedding table) and their per-row scales (None for float), as copies.

        For a row table (the token embeddings of a version-2 file) only the chunks holding these
        rows are awaited: they are fetched first, on extra requests beside the running one, and
        the rest of the table follows in the background. ``values`` has shape ``ids.shape + (cols,)``.

        Raises:
            KeyError: no such 2-D tensor. IndexError: a row out of range.
            StreamloadError: the download failed.

        Example:
            >>> ids = model.tokenizer.encode("hello world").ids                    # doctest: +SKIP
            >>> values, scales = await model.rows("embeddings.word_embeddings.weight", ids)
        """
        return await self._session.rows(name, np.asarray(ids))

    async def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """An encoder's embeddings: (B, H) float32 for a list of B texts, (H,) for one string.

        Waits only for what the texts need (the header, the blocks, their rows of the token table).

        Raises:
            UsageError: ``texts`` is not a string or a non-empty list of non-empty strings.
            RuntimeModelError: the model is a decoder, or has no tokenizer.

        Example:
            >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:   # doctest: +SKIP
            ...     vectors = await model.embed(["hello world", "streaming"])
            >>> vectors.shape
            (2, 384)
        """
        from . import api

        return await api.embed(self, texts)

    async def generate(
        self, prompt: str | Sequence[int], *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> AsyncIterator[str]:
        """A decoder's continuation of ``prompt`` (text, or token ids), yielded as text pieces as each token is sampled.

        Args:
            prompt: the text to continue (as given: no chat template; ``streamload.api.apply_chat_template`` renders one).
            max_new_tokens: 0 or more. temperature: 0 (greedy) or more. top_p: in (0, 1]. seed: 0 or more.

        Raises:
            UsageError: an argument out of its range. RuntimeModelError: an encoder, or no tokenizer.

        Example:
            >>> async with streamload.open("http://127.0.0.1:8800/llama.slm") as model:    # doctest: +SKIP
            ...     async for piece in model.generate("The sky is", max_new_tokens=8):
            ...         print(piece, end="", flush=True)
        """
        from . import api

        async for piece in api.generate(self, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed):
            yield piece

    async def layers(self) -> AsyncIterator[tuple[int, Layer]]:
        """Yield (index, layer) in execution order, each as soon as it is ready."""
        for index in range(len(self.manifest.layers)):
            yield index, await self.layer(index)

    async def wait_complete(self) -> DownloadStats:
        """Wait until every chunk is in the cache, those that were cached checked first; returns the run's stats."""
        await self._session.wait_complete()
        return self._session.stats


class CoarseModel:
    """A ``Model`` whose layers are its coarse layers (``Model.coarse``): what a preview pass runs on."""

    def __init__(self, model: Model) -> None:
        self._model = model

    async def layer(self, index: int) -> Layer:
        return await self._model.coarse_layer(index)

    @property
    def layer_ready_s(self) -> list[float | None]:
        return self._model.layer_coarse_ready_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


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
    headers: Mapping[str, str] | None = None,
    mirrors: Sequence[str] = (),
    limit_rate_bytes_per_s: float | None = None,
) -> AsyncIterator[Model]:
    """Open a model from an http(s) URL or a local .slm path; layers stream in while you use it.

    Args:
        source: URL (optionally ``#sha256=DIGEST``) or path of a .slm file, or a cached model's name or digest prefix.
        cache_dir: where verified layers are kept (default ``$STREAMLOAD_CACHE`` or ``~/.cache/streamload``).
        digest: refuse any model whose manifest digest differs (also lets a complete cache work offline).
        connections: parallel ranged requests (1 keeps layers strictly in order: best time to layer 0).
        session: an ``aiohttp.ClientSession`` to borrow (default: one owned by this call, made only when needed). One
            with default headers (other than User-Agent, Accept, Accept-Language) or ``auth`` is refused (UsageError):
            aiohttp would send them to every host, redirect targets and mirrors included; give them as ``headers``.
        progress: called with a ``Progress`` at most every 0.1 s and at the end.
        retry: retry and timeout policy for the network.
        verify_threads: threads that receive, hash, decompress and store chunks (default:
            cores + 1, at most 8: one thread waits on the connection while the others compute).
        headers: extra request headers for a private model, e.g. ``{"Authorization": "Bearer TOKEN"}``;
            sent to the URL's origin (scheme, host, port) only, never to a redirect target on another host.
        mirrors: other URLs of the same .slm file. Each is used once its header shows the same manifest
            digest (another model is refused and logged); spans are spread over all of them by their
            measured rates, and one that fails or serves corrupt chunks is dropped while the others
            take its share. ``connections`` then counts per source, at least 2 each.
        limit_rate_bytes_per_s: a cap on the download's bandwidth, over every connection and mirror together
            (one token bucket; ``RetryPolicy.limit_rate_bytes_per_s`` is the same setting).

    Raises:
        InvalidURLError: ``source`` or a mirror is not a usable http(s) URL (a port out of range, say).
        UsageError: a header that cannot be sent, or a borrowed session with default headers or auth.
        FetchError, DigestMismatchError, FormatError, CacheError: before the model is returned;
        later failures surface from ``layer()`` and ``wait_complete()``.

    Example:
        >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:   # doctest: +SKIP
        ...     async for index, layer in model.layers():
        ...         print(index, layer.name, list(layer.tensors)[:2])
    """
    check_session(session)  # before the cache may answer without a request: refused whatever the cache holds
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = os.fspath(source)
    if not is_url(source) and not Path(source).exists():  # a cached model's name or digest prefix, as `streamload list` shows
        from .download.origin import resolve_cached_source

        source, cached_digest = resolve_cached_source(cache_root, source)
        digest = digest or cached_digest
    download_session = DownloadSession(
        source,
        cache_root=cache_root,
        digest=digest,
        connections=connections,
        session=session,
        progress=progress,
        retry=dataclasses.replace(retry or RetryPolicy(), limit_rate_bytes_per_s=limit_rate_bytes_per_s)
        if limit_rate_bytes_per_s is not None
        else retry or RetryPolicy(),
        verify_threads=verify_threads or default_verify_threads(),
        headers=check_headers(headers),
        mirrors=mirrors,
    )
    try:
        await download_session.start()
        yield Model(download_session)
    finally:
        await download_session.close()


async def read_remote_header(
    url: str,
    *,
    session: aiohttp.ClientSession | None = None,
    retry: RetryPolicy | None = None,
    headers: Mapping[str, str] | None = None,
    give_up_unreachable: bool = False,
) -> tuple[Manifest, int]:
    """The manifest of a model URL and the file's size, with one or two small requests (no data); ``headers`` as for ``open``.

    ``give_up_unreachable``: a server nobody answers at (connection refused, no such host) ends the retries at once.
    """
    from .transport.http_source import HttpSource

    policy = retry or RetryPolicy()
    source = HttpSource(url, policy, session, headers)
    try:
        header = await read_header_with_retries(source, policy, give_up_unreachable=give_up_unreachable)
        return header.manifest, header.data_offset + header.manifest.data_size_bytes
    finally:
        await source.close()
