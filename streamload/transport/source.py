"""The contract every source of bytes implements, the one place transport failures are mapped, and the local file.

A ``Source`` opens spans of a model file; a ``SpanReader`` hands the body of one
span to pool threads, forward only: ``read_into(offset, view)`` blocks until
``view`` holds the file's bytes at ``offset`` (bytes before it, such as the
chunks a whole-file answer carries that the cache already has, are read and
dropped). ``abort`` (any thread) makes a blocked reader fail at once. The
implementations: ``rawhttp.SocketReader`` (plain socket or TLS, read by the
threads themselves), ``aiohttp_source.AiohttpReader`` (a body aiohttp receives
on the event loop) and ``FileReader`` here (a local .slm, memory-mapped).

``map_transport_errors`` turns what any of them raises into ``RetryableError``
(try again) or ``StalledError`` (no progress), as httpx's ``map_exceptions`` does;
``SpanReader.read_into`` applies it, together with the minimum-rate rule.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import mmap
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from ..errors import FetchError, ModelFileError, RetryableError, StalledError, UnreachableError
from .httputil import RetryPolicy

SKIP_BUFFER_BYTES = 1 << 20


def map_transport_error(url: str, policy: RetryPolicy, exc: BaseException, also: tuple[type[BaseException], ...] = ()) -> BaseException:
    """What a failing connect, request or body read surfaces as, whichever transport did it.

    A timeout is a ``StalledError``; a reset, a short body or any other transport
    failure (``OSError``, and the transport's own errors in ``also``) is a
    ``RetryableError`` (an ``UnreachableError`` when nobody answers at that address).
    Errors that are already ours, and anything else, are returned unchanged.
    """
    if isinstance(exc, FetchError | asyncio.CancelledError):
        return exc
    if isinstance(exc, asyncio.IncompleteReadError):
        return RetryableError(f"{url}: body ended {exc.expected - len(exc.partial)} bytes early")
    if isinstance(exc, TimeoutError):  # before OSError and the transports' own errors: some timeouts are both
        return StalledError(
            f"{url}: {exc}" if str(exc) else f"{url}: the server sent nothing for {policy.stall_timeout_s:g} s; the connection stalled"
        )
    if isinstance(exc, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(exc).upper().replace(" ", "_"):  # TLS to a plain-HTTP port
        plain = urllib.parse.urlsplit(url)._replace(scheme="http").geturl()
        return FetchError(f"{url}: TLS handshake failed (wrong version number): the server there speaks plain HTTP? try {plain}")
    if isinstance(exc, (OSError, *also)):
        if isinstance(exc, ConnectionRefusedError | socket.gaierror) or getattr(exc, "errno", None) in UNREACHABLE_ERRNOS:
            parts = urllib.parse.urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            if isinstance(exc, socket.gaierror) or isinstance(getattr(exc, "os_error", None), socket.gaierror):
                return UnreachableError(f"cannot resolve the host name {parts.hostname} ({_reason(exc)}): check the URL and the network")
            return UnreachableError(f"cannot connect to {parts.hostname}:{port} ({_reason(exc)})")
        return RetryableError(f"{url}: the connection failed ({_reason(exc)})")
    return exc


@contextlib.contextmanager
def map_transport_errors(url: str, policy: RetryPolicy, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """``map_transport_error`` around a block."""
    try:
        yield
    except BaseException as exc:
        mapped = map_transport_error(url, policy, exc, also)
        if mapped is exc:
            raise
        raise mapped from None


UNREACHABLE_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def _reason(exc: BaseException) -> str:
    """An OS error's own words ("Connection refused", "Name or service not known"), not its repr."""
    os_error = exc if isinstance(exc, OSError) else getattr(exc, "os_error", None)
    if isinstance(os_error, socket.gaierror):  # its errno is a resolver code (-2), not an errno os.strerror knows
        return os_error.strerror or str(os_error)
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno)
    if isinstance(os_error, OSError) and os_error.strerror:
        return os_error.strerror
    return _one_line(str(exc)) or type(exc).__name__


def _one_line(text: str, limit: int = 200) -> str:
    """A transport's own words as one bounded line: aiohttp's parser errors quote the server's bytes over lines."""
    line = " ".join(text.split())
    return line[:limit] + ("..." if len(line) > limit else "")


class SpanReader(abc.ABC):
    """The body of one request, read forward by pool threads (one at a time) into their buffers.

    Subclasses provide ``_recv_into`` (some bytes, 0 at the end of the body),
    ``abort`` and ``close``; this class keeps the position, drops skipped bytes,
    maps errors and enforces the policy's minimum rate.
    """

    url: str = ""
    transport_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, start: int, *, whole_file: bool, total_size_bytes: int | None, etag: str | None, policy: RetryPolicy) -> None:
        self.position = start  # file offset of the next body byte
        self.whole_file = whole_file  # the server sent the whole file (it ignored Range): a span that cannot be cut
        self.total_size_bytes = total_size_bytes
        self.etag = etag
        self.policy = policy
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def read_into(self, offset: int, target: memoryview) -> None:
        """Fill ``target`` with the file's bytes at ``offset`` (blocking). RetryableError / StalledError on failure,
        after which ``position - offset`` bytes of ``target`` hold the file's (none when negative)."""
        if offset < self.position:
            # the connection went past these bytes (a span was cut under it): they come on a new request, no data is lost
            raise RetryableError(f"{self.url}: the connection had already passed the bytes wanted; asking for them again")
        try:
            if offset > self.position:
                scratch = memoryview(bytearray(min(SKIP_BUFFER_BYTES, offset - self.position)))
                while self.position < offset:
                    self._fill(scratch[: min(scratch.nbytes, offset - self.position)])
            self._fill(target)
        except BaseException as exc:
            mapped = map_transport_error(self.url, self.policy, exc, self.transport_errors)
            if mapped is exc:
                raise
            raise mapped from None

    def _fill(self, target: memoryview) -> None:
        filled = 0
        limiter = self.policy.limiter  # --limit-rate: one bucket for the whole download
        while filled < target.nbytes:
            end = target.nbytes if limiter is None else min(target.nbytes, filled + limiter.receive_bytes)
            count = self._recv_into(target[filled:end])
            if limiter is not None:
                limiter.consume(count)
            if count == 0:
                raise RetryableError(f"{self.url}: the body ended {target.nbytes - filled} bytes early")
            filled += count
            self.position += count  # as it comes: after a failure, says how much of ``target`` arrived
            self._count(count)

    def _count(self, received_bytes: int) -> None:
        """The minimum-rate rule: fewer than min_rate x window bytes in a window means the link is stalled."""
        self._window_bytes += received_bytes
        now = time.monotonic()
        elapsed = now - self._window_start
        if elapsed >= self.policy.rate_window_s:
            floor = self.policy.min_rate_bytes_per_s
            if self.policy.limit_rate_bytes_per_s is not None:  # a cap shared by many connections: each may get little
                floor = min(floor, self.policy.limit_rate_bytes_per_s / 64)
            if self._window_bytes < floor * elapsed:
                raise StalledError(
                    f"{self.url}: {self._window_bytes} bytes in {elapsed:.0f} s, under the minimum rate of "
                    f"{self.policy.min_rate_bytes_per_s:.0f} bytes/s; the connection stalled"
                )
            self._window_start, self._window_bytes = now, 0

    @abc.abstractmethod
    def _recv_into(self, target: memoryview) -> int:
        """Receive some of the body into ``target``: the count received, 0 at the end of the body."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Make a blocked or later read fail at once (any thread)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection (no reader may be left)."""


class Source(Protocol):
    """Where a model's bytes come from: a URL or a local file."""

    url: str  # for messages and cache refs
    remote: bool  # False: a local file (a chunk that fails its hash there is fatal, not refetched)
    whole_file_only: bool  # the server ignores Range

    @property
    def etag(self) -> str | None:
        """The ETag the bytes are served under (None: a file, or a server that sends none)."""
        ...

    async def open_span(self, start: int, end: int | None) -> SpanReader:
        """The body of bytes [start, end) (end None: to the end of the file), or of the whole file."""
        ...

    async def unchanged(self, etag: str) -> bool:
        """Whether the bytes still carry this ETag (one conditional request); False when that cannot be known."""
        ...

    async def close(self) -> None: ...


class FileReader(SpanReader):
    """A span of a memory-mapped local file (one copy, from the page cache into the thread's buffer)."""

    def __init__(self, data: memoryview, start: int, end: int, url: str) -> None:
        super().__init__(start, whole_file=False, total_size_bytes=data.nbytes, etag=None, policy=RetryPolicy(min_rate_bytes_per_s=0.0))
        self._data = data
        self._end = end
        self.url = url

    def _recv_into(self, target: memoryview) -> int:
        count = max(0, min(target.nbytes, self._end - self.position))
        target[:count] = self._data[self.position : self.position + count]
        return count

    def abort(self) -> None:
        """Nothing to do: a read from the map never blocks."""

    def close(self) -> None:
        """Nothing to do: the map belongs to the ``FileSource``."""


class FileSource:
    """A local .slm file, memory-mapped read-only."""

    remote = False
    whole_file_only = False

    def __init__(self, path: Path) -> None:
        self.url = str(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else memoryview(b"")
        except IsADirectoryError:
            raise ModelFileError(f"{path}: is a directory, not a .slm file") from None
        except OSError as exc:
            raise ModelFileError(f"{path}: cannot open the model file ({exc.strerror or exc})") from None

    @property
    def size_bytes(self) -> int:
        return self.data.nbytes

    @property
    def etag(self) -> str | None:
        return None  # a file has no ETag

    async def unchanged(self, etag: str) -> bool:
        return False  # a file is never revalidated

    async def open_span(self, start: int, end: int | None) -> SpanReader:
        return FileReader(self.data, start, self.data.nbytes if end is None else min(end, self.data.nbytes), self.url)

    async def close(self) -> None:
        with contextlib.suppress(BufferError):  # views still alive: the map goes when they do
            self.data.release()
