"""The fetch step's fast path: a ranged GET whose body is received straight into chunk buffers.

aiohttp copies every body byte three times in user space (parser slice, stream
buffer join, our chunk buffer), all on the event loop thread, which then
competes with the verify threads for two cores. Here an asyncio
``BufferedProtocol`` hands the kernel our chunk buffer (``recv_into``): one copy,
kernel to chunk. It speaks just enough HTTP/1.1 for one ranged GET on plain
``http://``: a ``206`` with ``Content-Length`` and a matching ``Content-Range``.
Anything else raises ``Unsupported`` and the caller uses aiohttp instead, so
correctness never depends on this module.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse

HEADER_LIMIT_BYTES = 64 << 10
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Unsupported(Exception):
    """This response is not the simple case; use the general client."""


class StatusError(Exception):
    """The server answered with an error status the caller must handle as such (retry, or give up)."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.retry_after = retry_after


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header = bytearray(HEADER_LIMIT_BYTES)
        self.header_length = 0
        self.headers_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()  # -> body start
        self.leftover = memoryview(b"")  # body bytes that arrived with the headers
        self.target: memoryview | None = None
        self.filled = 0
        self.target_ready: asyncio.Future[None] | None = None
        self.closed = False
        self.error: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.headers_ready.done():
            return memoryview(self.header)[self.header_length :]
        assert self.target is not None  # reading is paused whenever there is no target
        return self.target[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if not self.headers_ready.done():
            self.header_length += nbytes
            end = self.header.find(b"\r\n\r\n", 0, self.header_length)
            if end >= 0:
                self.leftover = memoryview(self.header)[end + 4 : self.header_length]
                self.headers_ready.set_result(end + 4)
                self.transport.pause_reading()  # type: ignore[union-attr]
            elif self.header_length == len(self.header):
                self.headers_ready.set_exception(Unsupported("response headers over 64 KiB"))
                self.transport.close()  # type: ignore[union-attr]
            return
        self.filled += nbytes
        if self.target is not None and self.filled == self.target.nbytes:
            self.transport.pause_reading()  # type: ignore[union-attr]
            self.target = None
            if self.target_ready is not None and not self.target_ready.done():
                self.target_ready.set_result(None)

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the server closed the connection mid-body"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the connection closed mid-body"))

    def _fail(self, exc: BaseException) -> None:
        self.error = self.error or exc
        for future in (self.headers_ready, self.target_ready):
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()


class RawRange:
    """One ranged GET over its own connection. Use ``open``, then ``read_into`` repeatedly, then ``close``."""

    def __init__(self, protocol: _Protocol, start: int, total_size_bytes: int | None, etag: str | None) -> None:
        self._protocol = protocol
        self.start = start
        self.total_size_bytes = total_size_bytes
        self.etag = etag

    @classmethod
    async def open(cls, url: str, start: int, end: int, *, if_range: str | None, connect_timeout_s: float, read_timeout_s: float) -> RawRange:
        """Connect, send ``GET`` with ``Range: bytes=start-(end-1)`` and parse the head. Raises Unsupported or OSError."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
            raise Unsupported("only plain http URLs take the fast path")
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout_s):
            transport, protocol = await loop.create_connection(_Protocol, parts.hostname, parts.port or 80)
        try:
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            host = parts.netloc
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {host}",
                f"Range: bytes={start}-{end - 1}",
                "Accept-Encoding: identity",
                "Connection: close",
                "User-Agent: streamload",
            ]
            if if_range and not if_range.startswith("W/"):
                lines.append(f"If-Range: {if_range}")
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            async with asyncio.timeout(read_timeout_s):
                body_start = await protocol.headers_ready
            status, headers = _parse_head(bytes(protocol.header[:body_start]))
            if status >= 400:
                raise StatusError(status, headers.get("retry-after"))
            if status != 206 or "transfer-encoding" in headers or "content-encoding" in headers:
                raise Unsupported(f"status {status} or an encoded body")
            match = _CONTENT_RANGE.match(headers.get("content-range", ""))
            length = headers.get("content-length", "")
            if not match or int(match.group(1)) != start or int(match.group(2)) != end - 1 or not length.isdigit() or int(length) != end - start:
                raise Unsupported("Content-Range or Content-Length do not match the request")
            total = None if match.group(3) == "*" else int(match.group(3))
            return cls(protocol, start, total, headers.get("etag"))
        except BaseException:
            transport.close()
            raise

    async def read_into(self, target: memoryview, timeout_s: float) -> None:
        """Fill target with the next body bytes; OSError or TimeoutError when the connection fails or stalls."""
        protocol = self._protocol
        taken = min(protocol.leftover.nbytes, target.nbytes)
        if taken:
            target[:taken] = protocol.leftover[:taken]
            protocol.leftover = protocol.leftover[taken:]
        if taken == target.nbytes:
            return
        if protocol.error is not None:
            raise ConnectionResetError(str(protocol.error))
        protocol.target = target
        protocol.filled = taken
        protocol.target_ready = asyncio.get_running_loop().create_future()
        protocol.transport.resume_reading()  # type: ignore[union-attr]
        async with asyncio.timeout(timeout_s):
            await protocol.target_ready

    def close(self) -> None:
        if self._protocol.transport is not None:
            self._protocol.transport.close()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    match = _STATUS.match(head)
    if match is None:
        raise Unsupported("not an HTTP/1.x response")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise Unsupported("malformed header line")
        key = name.strip().decode("latin-1").lower()
        if key in headers:
            raise Unsupported(f"repeated {key} header")
        headers[key] = value.strip().decode("latin-1")
    return int(match.group(1)), headers
