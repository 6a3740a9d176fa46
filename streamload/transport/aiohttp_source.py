"""The general HTTP client: aiohttp receives a body on the event loop and pool threads take it chunk by chunk.

Used for what the threaded socket path (``rawhttp``) declines: a 200 with the
whole file, an encoded or chunked body, TLS it cannot settle, and borrowed
sessions (which may carry auth headers, cookies or tracing). Correct, and slower
on fast links: aiohttp copies each body byte on the loop (parser to stream
buffer), the reading thread copies it again into its chunk buffer, and each
received block (not each chunk) costs that thread one round trip to the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Mapping

import aiohttp

from ..errors import HTTPStatusError
from .httputil import (
    REDIRECT_STATUSES,
    RetryPolicy,
    TransportNotModified,
    TransportRedirect,
    http_status_error,
    range_headers,
    read_response_fields,
)
from .source import SpanReader, map_transport_errors

READ_BUFFER_BYTES = 4 << 20


def new_session() -> aiohttp.ClientSession:
    """A session tuned for large bodies: a 4 MiB read buffer means one 1 MiB chunk needs no
    pause/resume cycles of the transport (aiohttp's 64 KiB default costs ~8 per chunk)."""
    return aiohttp.ClientSession(auto_decompress=False, read_bufsize=READ_BUFFER_BYTES)


class AiohttpReader(SpanReader):
    """A response body that aiohttp receives on the loop; ``_recv_into`` (a pool thread) waits for the next block."""

    transport_errors = (aiohttp.ClientError, concurrent.futures.CancelledError)

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        start: int,
        *,
        whole_file: bool,
        total_size_bytes: int | None,
        etag: str | None,
        policy: RetryPolicy,
    ) -> None:
        super().__init__(start, whole_file=whole_file, total_size_bytes=total_size_bytes, etag=etag, policy=policy)
        self.response = response
        self.url = str(response.url)
        self.loop = asyncio.get_running_loop()
        self._carry = memoryview(b"")  # received bytes past the last filled target
        self._pending: concurrent.futures.Future[int] | None = None

    async def _next_block(self) -> bytes:
        block, _ = await self.response.content.readchunk()  # one received block, not joined (readany copies)
        return block

    def _recv_into(self, target: memoryview) -> int:
        """Copy from the last received block; only when it is used up, wait (one loop round trip) for the next."""
        if not self._carry.nbytes:
            self._pending = asyncio.run_coroutine_threadsafe(self._next_block(), self.loop)
            block = self._pending.result()
            if not block:
                return 0
            self._carry = memoryview(block)
        count = min(self._carry.nbytes, target.nbytes)
        target[:count] = self._carry[:count]
        self._carry = self._carry[count:]
        return count

    def abort(self) -> None:
        pending = self._pending
        if pending is not None:
            pending.cancel()
        self.loop.call_soon_threadsafe(self.response.close)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        """A body read to its end goes back to the session's pool (keep-alive); any other is closed."""
        if self.response.content.at_eof():
            self.response.release()
        else:
            self.response.close()


async def open_aiohttp_span(
    session: aiohttp.ClientSession,
    url: str,
    start: int,
    end: int | None,
    *,
    etag: str | None,
    policy: RetryPolicy,
    extra_headers: Mapping[str, str] | None = None,
) -> AiohttpReader:
    """GET bytes [start, end) (end None: to the end); a 200 (Range ignored) is a whole-file reader from offset 0.

    Redirects are not followed here but raised (``TransportRedirect``): ``HttpSource`` follows
    them for both paths alike, and decides which hop may see the caller's headers.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s, sock_read=policy.stall_timeout_s)
    headers = range_headers(start, end, etag, extra_headers)
    with map_transport_errors(url, policy, (aiohttp.ClientError,)):
        async with asyncio.timeout(policy.header_timeout_s):
            response = await session.get(url, headers=headers, timeout=timeout, allow_redirects=False)
    status = response.status
    if status in REDIRECT_STATUSES and response.headers.get("Location"):
        response.release()
        raise TransportRedirect(status, response.headers["Location"])
    if status == 304:
        response.release()
        raise TransportNotModified()
    if status not in (200, 206):
        response.release()
        raise http_status_error(url, status, response.reason or "", response.headers.get("Retry-After"))
    try:
        fields = read_response_fields(url, status, response.headers.get)  # every value used, checked
    except BaseException:
        response.release()
        raise
    if status == 206:
        parsed = fields.content_range
        if parsed is None or parsed[0] != start:
            response.release()
            raise HTTPStatusError(
                f"{url} sent 206 with Content-Range {response.headers.get('Content-Range')!r:.80} for a request from {start}", status=status
            )
        return AiohttpReader(response, start, whole_file=False, total_size_bytes=parsed[2], etag=fields.etag, policy=policy)
    return AiohttpReader(response, 0, whole_file=True, total_size_bytes=fields.content_length, etag=fields.etag, policy=policy)
