"""Where a model's header comes from, and a source for the bytes its cache lacks.

The header is read from the local file; from the cache, when the model is pinned and complete there (no network);
or from the URL: one open-ended request whose body goes on into the data, or, when the URL's model is cached whole,
first a conditional request (a 304: the cached copy is the file, nothing is read) and then a header probe. A server
that cannot be reached falls back to the complete cached copy the URL last had. ``reconnect`` finds a source again
when the header came from the cache and chunks turn out to be missing or damaged there.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..cache.model_cache import ModelCache
from ..cache.refs import read_ref, read_ref_etag
from ..errors import CacheError, DigestMismatchError, FetchError, FormatError, UnreachableError, redact_urls
from ..stats import DownloadStats
from ..transport.httputil import RetryPolicy, check_url
from ..transport.source import FileSource, Source
from .header import Header, parse_header, read_header, read_header_with_retries

if TYPE_CHECKING:
    from collections.abc import Mapping

    import aiohttp

logger = logging.getLogger(__name__)


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def split_pin(source: str, digest: str | None) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` pins the manifest digest, like pip's hash fragments. A URL is checked here, where it enters
    (``httputil.check_url``: InvalidURLError saying what is wrong)."""
    if "#sha256=" in source:
        source, _, pinned = source.partition("#sha256=")
        if digest is not None and digest.lower() != pinned.lower():
            raise DigestMismatchError(f"the URL pins sha256={pinned} but digest={digest} was also given")
        digest = pinned
    if digest is not None:
        digest = digest.lower().removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise DigestMismatchError(f"pinned digest {digest!r} is not 64 hex digits")
    return (check_url(source) if is_url(source) else source), digest


class Origin:
    """One model's source of truth: its URL or file, its pin, and the cache copies it may stand for."""

    def __init__(
        self,
        url: str,
        pinned: str | None,
        *,
        cache_root: Path,
        retry: RetryPolicy,
        session: aiohttp.ClientSession | None,
        headers: Mapping[str, str] | None,
        stats: DownloadStats,
    ) -> None:
        self.url = url
        self.pinned = pinned
        self.cache_root = cache_root
        self.retry = retry
        self.borrowed_session = session
        self.headers = headers  # the caller's, for the URL's origin only (HttpSource keeps them from other hosts)
        self.stats = stats
        self.source: Source | None = None  # None while the header came from the cache and nothing is missing
        self.revalidated_etag: str | None = None  # the cached copy's ETag, when the server said (304) it is still the file
        self.offline: FetchError | None = None  # why the server could not be reached, when the header came from the cache

    def use_cache_root(self, cache_root: Path) -> None:
        """Keep the cache under ``cache_root`` from now on (a private one: the given directory is not writable)."""
        self.cache_root = cache_root

    async def cached_pinned_header(self) -> Header | None:
        """The header of the pinned model when the cache holds it complete: then no network is needed."""
        if self.pinned is None or not is_url(self.url):
            return None
        cached = await self.cached_header(self.pinned)
        if cached is not None:
            logger.info("using cached %s (pinned, complete): no network", self.pinned[:12])
        return cached

    async def read_header(self) -> Header:
        """Preamble and manifest from the file, or from the server (the cache when it cannot be reached)."""
        if not is_url(self.url):
            self.source = FileSource(Path(self.url))
            return await read_header(self.source)
        from ..transport.http_source import HttpSource  # a local or pinned cached model never loads the HTTP clients

        self.source = HttpSource(self.url, self.retry, self.borrowed_session, self.headers)
        # one open-ended request whose body goes on into the data; a header probe when the URL's model is cached whole
        # (an open body would bring data nobody reads, on a metered link too), and before it, when the server gave
        # that copy an ETag, one conditional request: a 304 means the cached copy is the file, and nothing is read
        cached = await self._complete_copy_of_url()
        partial = await self._partial_copy() if cached is None else None  # offline, what it holds may be enough
        etag = read_ref_etag(self.cache_root, self.url) if cached is not None else None
        if cached is not None and etag is not None and await self._unchanged(etag):
            logger.info("%s is unchanged (ETag %s): using the cached %s", redact_urls(self.url), etag, cached.manifest.digest[:12])
            self.revalidated_etag = etag
            return cached
        # no open-ended request either when the cache holds another complete model: the new one may be its update, whose
        # chunks come from the cache or a delta file, and bytes the open body brings meanwhile would be wasted (one
        # round trip more for an unrelated model: docs/updates.md)
        from ..cache.reuse import holds_complete_model  # an update's module: imported when a URL is opened

        stream = cached is None and not await asyncio.to_thread(holds_complete_model, self.cache_root)
        try:
            # nobody answering ends the retries at once when the cache holds a complete copy to fall back to
            header = await self._fetch_with_retries(
                self.source, give_up_unreachable=cached is not None or partial is not None, stream=stream
            )
        except FetchError as exc:
            if cached is None and partial is not None and isinstance(exc, UnreachableError):
                return await self._offline_header(exc, partial, complete=False)
            return await self._offline_header(exc, cached)
        self.stats.bytes_downloaded += len(header.raw)
        return header

    async def reconnect(self, digest: str, missing: str) -> Source:
        """A source for the bytes the cache lacks (``missing`` says which) when the header came from the cache: the
        URL again, checked to serve the same model. Offline, or a file that is not the model's, a clear error."""
        if self.source is not None:
            return self.source
        if not is_url(self.url):
            raise CacheError(f"{missing}, and {self.url} is not a source of it")
        from ..transport.http_source import HttpSource

        source = HttpSource(self.url, self.retry, self.borrowed_session, self.headers)
        try:
            header = await self._fetch_with_retries(source, give_up_unreachable=True)
        except FetchError as exc:
            await source.close()
            raise FetchError(f"{missing} and {self.url} cannot be reached ({exc}); connect and run again") from None
        if header.manifest.digest != digest:
            await source.close()
            raise DigestMismatchError(
                f"{missing}, and {self.url} now serves another model ({header.manifest.digest[:12]}); "
                f"run without the pin to use it, or remove the cached copy of {digest[:12]}",
                cached_digest=digest,
            )
        self.source = source
        self.stats.bytes_downloaded += len(header.raw)
        return source

    async def close(self) -> None:
        if self.source is not None:
            await self.source.close()

    async def cached_header(self, digest: str) -> Header | None:
        """The header of a complete cached model, or None (also when the cached header is damaged: it is fetched again)."""
        try:
            cached = ModelCache(self.cache_root, digest)
        except CacheError:
            return None
        raw = cached.read_header() if cached.is_complete() else None
        if raw is None:
            return None
        try:
            header = await parse_header(raw, None)
        except FormatError as exc:
            logger.warning("the cached header of %s is damaged (%s); it is fetched again", digest[:12], exc)
            return None
        if header.manifest.digest != digest:  # a directory is named by its model's digest: this header is not its own
            logger.warning("the cached header of %s is another model's (%s); it is fetched again", digest[:12], header.manifest.digest[:12])
            return None
        return header

    async def _unchanged(self, etag: str) -> bool:
        """The server says (304) the URL still has the cached copy's ETag; any failure: False (the header is fetched)."""
        if self.source is None:
            return False
        try:
            return await self.source.unchanged(etag)
        except (FetchError, OSError, TimeoutError) as exc:
            logger.debug("%s: revalidating the cached copy failed (%s)", redact_urls(self.url), exc)
            return False

    async def _fetch_with_retries(self, source: Source, *, give_up_unreachable: bool = False, stream: bool = False) -> Header:
        """The source's header, retrying with backoff. A server that cannot be reached at all (connection refused,
        no such host) ends the retries at once with ``give_up_unreachable``."""
        return await read_header_with_retries(source, self.retry, give_up_unreachable=give_up_unreachable, stream=stream)

    async def _complete_copy_of_url(self) -> Header | None:
        digest = read_ref(self.cache_root, self.url)
        return await self.cached_header(digest) if digest else None

    async def _partial_copy(self) -> Header | None:
        """The cached header of the pinned model or of the URL's last one, when its copy is partial (None otherwise)."""
        digest = self.pinned or read_ref(self.cache_root, self.url)
        if digest is None:
            return None
        try:
            raw = ModelCache(self.cache_root, digest).read_header()
            return await parse_header(raw, None) if raw is not None else None
        except (CacheError, FormatError, OSError):
            return None

    async def _offline_header(self, failure: FetchError, cached: Header | None, *, complete: bool = True) -> Header:
        """The server cannot be reached: the cached copy this URL last had (a partial one is used for what it holds),
        or the failure."""
        if cached is None:
            raise failure
        self.offline = failure
        what = "cached copy" if complete else "partial cached copy (for what it holds)"
        logger.warning("%s; using the %s %s", failure, what, cached.manifest.digest[:12])
        if self.source is not None:
            await self.source.close()
        self.source = None
        return cached


def resolve_cached_source(root: Path, source: str) -> tuple[str, str]:
    """(URL or file to read the rest from, pinned digest) of the one cached model ``source`` names.

    Raises:
        CacheError: no cached model of that name or digest; several (all listed); or one whose source is gone.
    """
    from ..cache.listing import one_cached_model  # a cached model's name: not on the path of a URL or a file

    model = one_cached_model(root, source)
    urls = [s for s in model.sources if is_url(s)]
    files = [s for s in model.sources if not is_url(s) and Path(s).is_file()]
    if not urls and not files:
        gone = f" ({' and '.join(model.sources)} {'is' if len(model.sources) == 1 else 'are'} gone)" if model.sources else ""
        raise CacheError(f"cached model {model.digest[:12]} came from a local file{gone}: give the file's path or a URL")
    return (urls or files)[0], model.digest
