"""A model URL on any HTTP server: each span on the threaded socket path when it can, on aiohttp when it must.

The bundled server, nginx, any static host or CDN answer a ranged GET with a 206,
which pool threads read from a plain socket (``rawhttp``). A response that path
declines (a 200 with the whole file, an encoded body, TLS it cannot settle) turns
the fast path off for the model and goes through aiohttp (``aiohttp_source``), as
does everything on a borrowed aiohttp session. The first response's ETag is kept:
it is sent as If-Range, and a later response with another ETag means the file was
replaced on the server (``SourceChangedError``).
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from .errors import SourceChangedError, TransportStatus, TransportUnsupported
from .httputil import RetryPolicy, http_status_error
from .rawhttp import open_socket_span
from .transport import SpanReader, map_transport_errors

if TYPE_CHECKING:
    import aiohttp

logger = logging.getLogger(__name__)


class HttpSource:
    """One model URL; spans open on whichever HTTP path suits the server."""

    remote = True

    def __init__(self, url: str, policy: RetryPolicy, session: aiohttp.ClientSession | None = None) -> None:
        self.url = url
        self.policy = policy
        self.session = session
        self._own_session = session is None
        self.fast_path = session is None  # a borrowed session may carry auth headers: all its requests go through it
        self.whole_file_only = False  # the server ignores Range
        self.etag: str | None = None

    async def open_span(self, start: int, end: int | None) -> SpanReader:
        """The body of bytes [start, end) (end None: to the end of the file), or of the whole file when Range is ignored."""
        reader: SpanReader | None = None
        if self.fast_path and not self.whole_file_only:
            reader = await self._open_socket(start, end)
        if reader is None:
            reader = await self._open_aiohttp(start, end)
        self._check_identity(reader)
        return reader

    async def _open_socket(self, start: int, end: int | None) -> SpanReader | None:
        try:
            with map_transport_errors(self.url, self.policy):
                return await open_socket_span(self.url, start, end, etag=self.etag, policy=self.policy)
        except (TransportUnsupported, ssl.SSLError) as exc:  # TLS the fast path cannot settle: aiohttp decides (and words any error)
            logger.info("%s: using the general HTTP client (%s)", self.url, exc)
            self.fast_path = False
            return None
        except TransportStatus as exc:
            raise http_status_error(self.url, exc.status, "", exc.retry_after) from None

    async def _open_aiohttp(self, start: int, end: int | None) -> SpanReader:
        from .aiohttp_source import new_session, open_aiohttp_span  # only servers that need it load aiohttp

        if self.session is None:
            self.session = new_session()
        reader = await open_aiohttp_span(self.session, self.url, start, end, etag=self.etag, policy=self.policy)
        if reader.whole_file and not self.whole_file_only:
            logger.info("%s ignores Range requests: downloading the whole file in order", self.url)
            self.whole_file_only = True
        return reader

    def _check_identity(self, reader: SpanReader) -> None:
        """Pin the first ETag; a different strong one later means the file on the server was replaced."""
        if self.etag is None:
            self.etag = reader.etag
        elif reader.etag is not None and reader.etag != self.etag and not reader.etag.startswith("W/"):
            reader.close()
            raise SourceChangedError(
                f"the file at {self.url} changed on the server during the download (ETag {self.etag} -> {reader.etag}); "
                "what was verified is kept, and a new run fetches the new model"
            )

    async def close(self) -> None:
        if self._own_session and self.session is not None:
            await self.session.close()
