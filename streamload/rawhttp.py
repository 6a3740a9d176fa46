"""The fetch step's fast path: one ranged GET on a plain socket whose body pool threads read.

aiohttp receives on the event loop thread and copies every body byte three times
in user space (parser slice, stream buffer join, our chunk buffer). Here the
connection is opened on the event loop (connect, request, response head), and
then the body is read with blocking ``recv_into`` straight into chunk buffers,
one copy from the kernel, by the threads that verify the chunks (see
``streamload.loader``'s span pump): the event loop does no per-byte work, and a
chunk is hashed, decompressed and stored by the thread that received it while it
is still in that core's cache.

It speaks just enough HTTP/1.1 for one ranged GET on plain ``http://``: a
``206`` with ``Content-Length`` and a matching ``Content-Range``. Anything else
raises ``Unsupported`` and the caller uses aiohttp instead, so correctness never
depends on this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
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


class RawRange:
    """One ranged GET over its own connection: ``open`` on the event loop, then ``read_into`` on threads.

    ``read_into`` blocks and must not run on the event loop; callers serialize it
    (one reader at a time, in body order). ``abort`` may be called from any
    thread to make a blocked reader fail at once; ``close`` once no reader is left.
    """

    def __init__(self, sock: socket.socket, start: int, total_size_bytes: int | None, etag: str | None, leftover: bytes) -> None:
        self._sock = sock
        self._leftover = memoryview(leftover)  # body bytes that arrived with the response head
        self.start = start
        self.total_size_bytes = total_size_bytes
        self.etag = etag

    @classmethod
    async def open(cls, url: str, start: int, end: int, *, if_range: str | None, connect_timeout_s: float, read_timeout_s: float) -> RawRange:
        """Connect, send ``GET`` with ``Range: bytes=start-(end-1)`` and parse the head.

        Raises Unsupported (use the general client), StatusError (an error status),
        TimeoutError (no connection or no answer in time) or OSError.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
            raise Unsupported("only plain http URLs take the fast path")
        sock = await _connect(parts.hostname, parts.port or 80, connect_timeout_s)
        try:
            loop = asyncio.get_running_loop()
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            lines = [
                f"GET {target} HTTP/1.1",
                f"Host: {parts.netloc}",
                f"Range: bytes={start}-{end - 1}",
                "Accept-Encoding: identity",
                "Connection: close",
                "User-Agent: streamload",
            ]
            if if_range and not if_range.startswith("W/"):
                lines.append(f"If-Range: {if_range}")
            head = bytearray(HEADER_LIMIT_BYTES)
            received = 0
            async with asyncio.timeout(read_timeout_s):
                await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
                while (head_end := head.find(b"\r\n\r\n", 0, received)) < 0:
                    if received == len(head):
                        raise Unsupported("response headers over 64 KiB")
                    count = await loop.sock_recv_into(sock, memoryview(head)[received:])
                    if count == 0:
                        raise ConnectionResetError("the server closed the connection before answering")
                    received += count
            status, headers = _parse_head(bytes(head[:head_end]))
            if status >= 400:
                raise StatusError(status, headers.get("retry-after"))
            if status != 206 or "transfer-encoding" in headers or "content-encoding" in headers:
                raise Unsupported(f"status {status} or an encoded body")
            match = _CONTENT_RANGE.match(headers.get("content-range", ""))
            length = headers.get("content-length", "")
            if not match or int(match.group(1)) != start or int(match.group(2)) != end - 1 or not length.isdigit() or int(length) != end - start:
                raise Unsupported("Content-Range or Content-Length do not match the request")
            total = None if match.group(3) == "*" else int(match.group(3))
            sock.settimeout(read_timeout_s)  # from here on a blocking socket, read by threads; a stall raises TimeoutError
            return cls(sock, start, total, headers.get("etag"), bytes(head[head_end + 4 : received]))
        except BaseException:
            sock.close()
            raise

    def read_into(self, target: memoryview) -> None:
        """Fill target with the next body bytes (blocking). OSError when the connection breaks, TimeoutError when it stalls."""
        filled = min(self._leftover.nbytes, target.nbytes)
        if filled:
            target[:filled] = self._leftover[:filled]
            self._leftover = self._leftover[filled:]
        size = target.nbytes
        while filled < size:
            count = self._sock.recv_into(target[filled:], size - filled)
            if count == 0:
                raise ConnectionResetError("the server closed the connection mid-body")
            filled += count

    def abort(self) -> None:
        """Make a blocked or later ``read_into`` fail at once (any thread)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


async def _connect(host: str, port: int, timeout_s: float) -> socket.socket:
    """A connected non-blocking socket to the first address of host that answers."""
    loop = asyncio.get_running_loop()
    failure: OSError | None = None
    async with asyncio.timeout(timeout_s):
        for family, kind, proto, _, address in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                failure = exc
                continue
            except BaseException:
                sock.close()
                raise
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
    raise failure or OSError(f"{host} has no address")


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
