"""The receive step's fast path: one ranged GET on a plain socket whose body pool threads read.

aiohttp receives on the event loop thread and copies every body byte three times
in user space (parser slice, stream buffer join, our chunk buffer). Here the
connection is opened on the event loop (connect, request, response head), and
then the body is read with blocking ``recv_into`` straight into chunk buffers,
one copy from the kernel, by the threads that verify the chunks (see
``streamload.download.pipeline``): the event loop does no per-byte work, and a
chunk is hashed, decompressed and stored by the thread that received it while it
is still in that core's cache.

It speaks just enough HTTP/1.1 for one ranged GET: a ``206`` with
``Content-Length`` and a matching ``Content-Range``, or a redirect, raised as
``TransportRedirect`` for ``HttpSource`` to follow. Anything else raises
``TransportUnsupported`` and the caller uses aiohttp instead, so correctness never
depends on this module. Over ``https://`` the connection and TLS handshake are
made on a helper thread (an ``ssl.SSLSocket`` cannot be driven by the event
loop's socket calls), and the threads reading the body also decrypt it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping

from .httputil import (
    REDIRECT_STATUSES,
    RetryPolicy,
    TransportNotModified,
    TransportRedirect,
    TransportStatus,
    TransportUnsupported,
    range_headers,
    read_response_fields,
)
from .source import SpanReader

HEADER_LIMIT_BYTES = 64 << 10
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})")


class SocketReader(SpanReader):
    """One ranged GET over its own connection: opened on the event loop, its body read by pool threads.

    ``_recv_into`` blocks; the caller serializes reads (one reader at a time, in
    body order). ``abort`` may be called from any thread to make a blocked reader
    fail at once; ``close`` once no reader is left.
    """

    def __init__(
        self,
        sock: socket.socket,
        start: int,
        total_size_bytes: int | None,
        etag: str | None,
        leftover: bytes,
        url: str,
        policy: RetryPolicy,
        *,
        whole_file: bool = False,
    ) -> None:
        super().__init__(start, whole_file=whole_file, total_size_bytes=total_size_bytes, etag=etag, policy=policy)
        self._sock = sock
        self._leftover = memoryview(leftover)  # body bytes that arrived with the response head
        self.url = url

    def _recv_into(self, target: memoryview) -> int:
        if self._leftover.nbytes:
            count = min(self._leftover.nbytes, target.nbytes)
            target[:count] = self._leftover[:count]
            self._leftover = self._leftover[count:]
            return count
        count = self._sock.recv_into(target, target.nbytes)
        if count == 0:
            raise ConnectionResetError("the server closed the connection mid-body")
        return count

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            # the plain socket's shutdown(2), also for TLS: SSLSocket.shutdown would drop the SSL
            # object under a thread that is reading with it
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        self._sock.close()


async def open_socket_span(
    url: str,
    start: int,
    end: int | None,
    *,
    etag: str | None,
    policy: RetryPolicy,
    ssl_context: ssl.SSLContext | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> SocketReader:
    """Connect, send ``GET`` for bytes [start, end) (end None: to the end of the file) and parse the head.

    ``ssl_context``: for https (default: ``ssl.create_default_context()``, the system's CAs).
    ``extra_headers``: the caller's own (checked by ``httputil.check_headers``).
    The whole head must arrive within ``policy.header_timeout_s``. A plain 200 to ``bytes=0-`` (a server that
    ignores Range) is read here too, as a whole-file body.
    Raises TransportUnsupported (use the general client), TransportStatus (an error status),
    TransportRedirect (a 3xx with a Location), TimeoutError (no connection or no answer in time) or OSError (ssl.SSLError included).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise TransportUnsupported("only http and https URLs without credentials take the fast path")
    target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
    lines = [f"GET {target} HTTP/1.1", f"Host: {parts.netloc}"]
    lines += [f"{name}: {value}" for name, value in range_headers(start, end, etag, extra_headers).items()]
    lines += ["Connection: close", "User-Agent: streamload"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if parts.scheme == "https":
        context = ssl_context or _default_tls_context()
        sock, head, received = await _in_thread(
            _open_tls,
            parts.hostname,
            parts.port or 443,
            request,
            context,
            policy.connect_timeout_s,
            policy.header_timeout_s,
            policy.stall_timeout_s,
        )
    else:
        sock = await _connect(parts.hostname, parts.port or 80, policy.connect_timeout_s)
        try:
            head, received = await _exchange(sock, request, policy.header_timeout_s)
        except BaseException:
            sock.close()
            raise
    try:
        head_end = head.find(b"\r\n\r\n", 0, received)
        status, headers = _parse_head(bytes(head[:head_end]))
        if status >= 400:
            raise TransportStatus(status, headers.get("retry-after"))
        if status in REDIRECT_STATUSES and headers.get("location"):
            raise TransportRedirect(status, headers["location"])
        if status == 304:
            raise TransportNotModified()
        fields = read_response_fields(url, status, lambda name: headers.get(name.lower()))  # every value used, checked
        length = fields.content_length
        encoded = "transfer-encoding" in headers or "content-encoding" in headers
        leftover = bytes(head[head_end + 4 : received])
        if status == 200 and start == 0 and end is None and length is not None and not encoded:
            # the whole file for "bytes=0-": the same bytes, from a server that ignores Range (a whole-file body)
            sock.settimeout(policy.stall_timeout_s)
            return SocketReader(sock, 0, length, fields.etag, leftover, url, policy, whole_file=True)
        if status != 206 or encoded:
            raise TransportUnsupported(f"status {status} or an encoded body")
        parsed = fields.content_range
        if parsed is None or parsed[0] != start or length is None:
            raise TransportUnsupported("Content-Range or Content-Length do not match the request")
        first, last, total = parsed
        # a range past the end of the file is clamped to it (RFC 9110 section 14.1.2)
        expected_last = min(end if end is not None else 1 << 62, total if total is not None else 1 << 62) - 1
        if last != expected_last or length != last + 1 - first:
            raise TransportUnsupported("Content-Range or Content-Length do not match the request")
        sock.settimeout(policy.stall_timeout_s)  # from here on a blocking socket, read by threads; a stall raises TimeoutError
        return SocketReader(sock, start, total, fields.etag, leftover, url, policy)
    except BaseException:
        sock.close()
        raise


async def _exchange(sock: socket.socket, request: bytes, timeout_s: float) -> tuple[bytearray, int]:
    """Send the request on a non-blocking socket and receive at least the response head: (buffer, bytes in it)."""
    loop = asyncio.get_running_loop()
    head = bytearray(HEADER_LIMIT_BYTES)
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_sendall(sock, request)
            while not _head_complete(head, received):
                count = await loop.sock_recv_into(sock, memoryview(head)[received:])
                if count == 0:
                    raise ConnectionResetError("the server closed the connection before answering")
                received += count
    except TimeoutError:
        what = "sent no answer" if received == 0 else f"sent {received} bytes but no complete response head"
        raise TimeoutError(f"the server accepted the connection but {what} within {timeout_s:g} s") from None
    return head, received


def _open_tls(
    host: str, port: int, request: bytes, context: ssl.SSLContext, connect_timeout_s: float, header_timeout_s: float, read_timeout_s: float
) -> tuple[ssl.SSLSocket, bytearray, int]:
    """On a helper thread: connect, handshake, send the request, receive the response head (within header_timeout_s)."""
    raw = socket.create_connection((host, port), timeout=connect_timeout_s)
    sock: socket.socket = raw
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname=host)  # the handshake, within connect_timeout_s
        sock.settimeout(read_timeout_s)
        sock.sendall(request)
        head = bytearray(HEADER_LIMIT_BYTES)
        received = 0
        deadline = time.monotonic() + header_timeout_s
        while not _head_complete(head, received):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server accepted the connection but sent no complete response head within {header_timeout_s:g} s")
            count = sock.recv_into(memoryview(head)[received:])
            if count == 0:
                raise ConnectionResetError("the server closed the connection before answering")
            received += count
        return sock, head, received  # type: ignore[return-value]
    except BaseException:
        sock.close()
        raise


def _head_complete(head: bytearray, received: int) -> bool:
    if head.find(b"\r\n\r\n", 0, received) >= 0:
        return True
    if received == len(head):
        raise TransportUnsupported("response headers over 64 KiB")
    return False


async def _in_thread(fn: Callable[..., tuple[socket.socket, bytearray, int]], *args: object) -> tuple[socket.socket, bytearray, int]:
    """fn(*args) on the default executor; if the caller is cancelled meanwhile, the socket it opens is closed."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: done.cancelled() or done.exception() is not None or done.result()[0].close())
        raise


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


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
        raise TransportUnsupported("not an HTTP/1.x response")
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise TransportUnsupported("malformed header line")
        key = name.strip().decode("latin-1").lower()
        if key in headers:
            raise TransportUnsupported(f"repeated {key} header")
        headers[key] = value.strip().decode("utf-8", "surrogateescape")  # as aiohttp decodes them
    return int(match.group(1)), headers
