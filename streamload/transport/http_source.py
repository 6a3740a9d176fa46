"""A model URL on any HTTP server: each span on the threaded socket path when it can, on aiohttp when it must.

The bundled server, nginx, any static host or CDN answer a ranged GET with a 206,
which pool threads read from a plain socket (``rawhttp``). A response that path
declines (a 200 with the whole file, an encoded body, TLS it cannot settle) turns
the fast path off for the model and goes through aiohttp (``aiohttp_source``), as
does everything on a borrowed aiohttp session. The first response's ETag is kept:
it is sent as If-Range, and a later response with another ETag means the file was
replaced on the server (``FileChangedError``).

Redirects (a model hub sending each download to an object store, an S3 presigned
URL) are followed here, for both paths alike, with the Range re-sent at each hop.
Where the chain ended is kept, so later spans go straight there; when that URL
answers 400, 401, 403 or 410 (what S3, GCS and Azure answer once a signed URL has
expired) or cannot be reached, the chain is resolved again from the URL the caller
gave. The caller's headers (``Authorization``) go only to hops on the origin of
that URL (RFC 6454: scheme, host, port), never to another host, as
huggingface_hub and requests do. The model's identity stays its manifest digest
(each chunk is checked against it, and the cache keys the caller's URL, not a
signed one); ETags are compared per origin, since two hosts of one file need not
share them.
"""

from __future__ import annotations

import logging
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import (
    FileChangedError,
    HTTPStatusError,
    MalformedResponseError,
    RetryableError,
    UnreachableError,
    redact_urls,
)
from .httputil import (
    RetryPolicy,
    TransportNotModified,
    TransportRedirect,
    TransportStatus,
    TransportUnsupported,
    check_headers,
    check_session,
    check_url,
    http_status_error,
    resolve_location,
    same_origin,
)
from .rawhttp import open_socket_span
from .source import SpanReader, map_transport_errors

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 10  # hops in one chain, as browsers and requests allow (about 20 and 30): a loop ends with an error
EXPIRED_STATUSES = frozenset({400, 401, 403, 410})  # a signed URL past its time: S3 and Azure say 403, GCS 400


class HttpSource:
    """One model URL; spans open on whichever HTTP path suits the server, following its redirects."""

    remote = True

    def __init__(
        self, url: str, policy: RetryPolicy, session: aiohttp.ClientSession | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        check_session(session)  # one with default headers or auth would send them to every host
        self.url = url = check_url(url)
        self.policy = policy
        self.session = session
        self.headers = check_headers(headers)  # sent to the origin of url only
        self._own_session = session is None
        self.fast_path = session is None  # a borrowed session may carry auth headers: all its requests go through it
        self.whole_file_only = False  # the server ignores Range
        self.resolved_url = url  # where the last redirect chain ended: the next span starts there
        self.etags: dict[str, str | None] = {}  # the first ETag seen per origin

    @property
    def etag(self) -> str | None:
        """The pinned ETag of the host that serves the bytes now."""
        return self.etags.get(_origin(self.resolved_url))

    async def open_span(self, start: int, end: int | None) -> SpanReader:
        """The body of bytes [start, end) (end None: to the end of the file), or of the whole file when Range is ignored."""
        try:
            reader = await self._follow(self.resolved_url, start, end)
        except (HTTPStatusError, RetryableError) as exc:
            expired = isinstance(exc, HTTPStatusError) and exc.status in EXPIRED_STATUSES
            if self.resolved_url == self.url or not (expired or isinstance(exc, UnreachableError)):
                raise
            logger.info("%s: %s; resolving %s again", redact_urls(_origin(self.resolved_url)), exc, redact_urls(self.url))
            self.resolved_url = self.url
            if not expired:
                raise  # the retry (after its backoff) resolves again
            reader = await self._follow(self.url, start, end)
        self._check_identity(reader)
        return reader

    async def unchanged(self, etag: str) -> bool:
        """Whether the file still has this ETag: one conditional request (``If-None-Match``, one byte asked for), no
        body when it does (304). A server that ignores the condition answers with the byte: False."""
        try:
            reader = await self._follow(self.url, 0, 1, if_none_match=etag)
        except TransportNotModified:
            return True
        reader.close()
        return False

    async def _follow(self, url: str, start: int, end: int | None, *, if_none_match: str | None = None) -> SpanReader:
        """The span at url, after up to MAX_REDIRECTS redirects (each hop sent the Range again)."""
        status = 0
        for _ in range(MAX_REDIRECTS + 1):
            try:
                reader = await self._open_at(url, start, end, if_none_match)
            except TransportNotModified:
                if if_none_match is not None:
                    raise
                raise MalformedResponseError(f"{url} answered 304 Not Modified to a request that was not conditional") from None
            except TransportRedirect as redirect:
                target = resolve_location(url, redirect.location, redirect.status)
                logger.debug("%s redirected (%d) to %s", redact_urls(url), redirect.status, redact_urls(target))
                url, status = target, redirect.status
                continue
            self.resolved_url = url
            if reader.whole_file and not self.whole_file_only:  # on either receive path
                logger.info("%s ignores Range requests: downloading the whole file in order", redact_urls(url))
                self.whole_file_only = True
            return reader
        raise HTTPStatusError(f"{self.url} redirected more than {MAX_REDIRECTS} times; check the URL", status=status)

    async def _open_at(self, url: str, start: int, end: int | None, if_none_match: str | None = None) -> SpanReader:
        headers = self.headers if same_origin(url, self.url) else None  # credentials never leave the origin
        if if_none_match is not None:
            headers = {**(headers or {}), "If-None-Match": if_none_match}
        etag = self.etags.get(_origin(url))
        reader: SpanReader | None = None
        if self.fast_path and not self.whole_file_only:
            reader = await self._open_socket(url, start, end, etag, headers)
        if reader is None:
            reader = await self._open_aiohttp(url, start, end, etag, headers)
        return reader

    async def _open_socket(
        self, url: str, start: int, end: int | None, etag: str | None, headers: Mapping[str, str] | None
    ) -> SpanReader | None:
        try:
            with map_transport_errors(url, self.policy):
                return await open_socket_span(url, start, end, etag=etag, policy=self.policy, extra_headers=headers)
        except (TransportUnsupported, ssl.SSLError) as exc:  # TLS the fast path cannot settle: aiohttp decides (and words any error)
            logger.info("%s: using the general HTTP client (%s)", redact_urls(url), exc)
            self.fast_path = False
            return None
        except TransportStatus as exc:
            raise http_status_error(url, exc.status, "", exc.retry_after) from None

    async def _open_aiohttp(self, url: str, start: int, end: int | None, etag: str | None, headers: Mapping[str, str] | None) -> SpanReader:
        from .aiohttp_source import new_session, open_aiohttp_span  # only servers that need it load aiohttp

        if self.session is None:
            self.session = new_session()
        return await open_aiohttp_span(self.session, url, start, end, etag=etag, policy=self.policy, extra_headers=headers)

    def _check_identity(self, reader: SpanReader) -> None:
        """Pin the first ETag of each origin; a different one later (compared weakly, RFC 9110 section 8.8.3.2: Apache
        marks a just-modified file's tag weak, then strong) means the file on that host was replaced."""
        origin = _origin(self.resolved_url)
        pinned = self.etags.get(origin)
        if pinned is None or (pinned.startswith("W/") and reader.etag == pinned.removeprefix("W/")):
            self.etags[origin] = reader.etag  # the first tag, or its strong form (If-Range needs a strong one)
        elif reader.etag is not None and not reader.etag.startswith("W/") and reader.etag != pinned.removeprefix("W/"):
            reader.close()
            raise FileChangedError(
                f"the file at {self.url} changed on the server during the download (ETag {pinned} -> {reader.etag}); "
                "what was verified is kept, and a new run fetches the new model"
            )

    async def close(self) -> None:
        if self._own_session and self.session is not None:
            await self.session.close()


def _origin(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
