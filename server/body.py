"""Writing a response body: bytes [start, end) of a served file, by sendfile or from its memory map, in pieces sized to
the client's pace (``slots.Transfer``), each under the transfer's stall timeout, paced to the emulated link's rate.

Runs on the event loop; the file is opened in a worker thread. Per piece: one sendfile call or one write of a slice of
a memoryview of the map, and a token-bucket wait when the rate is limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time

from aiohttp import web

from .files import ServedFile
from .slots import Transfer

logger = logging.getLogger(__name__)

UNTHROTTLED_PIECE_BYTES = 1 << 20


class TokenBucket:
    """Paces bytes to ``rate_bytes_per_s`` with a burst of ``capacity_bytes``."""

    def __init__(self, rate_bytes_per_s: float, capacity_bytes: float) -> None:
        self.rate = rate_bytes_per_s
        self.capacity = capacity_bytes
        self._tokens = capacity_bytes
        self._stamp = time.monotonic()

    async def take(self, size_bytes: int) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= size_bytes
        if self._tokens < 0:
            await asyncio.sleep(-self._tokens / self.rate)


async def write_body(
    request: web.Request,
    response: web.StreamResponse,
    served: ServedFile,
    start: int,
    end: int,
    rate_bytes_per_s: float | None,
    transfer: Transfer,
) -> None:
    """Write bytes [start, end) of ``served`` in pieces, each under ``transfer``'s stall timeout, at most
    ``rate_bytes_per_s`` (None: unthrottled, by sendfile where the transport allows); a stalled or evicted client is
    reset, one that went away is logged."""
    try:
        if not rate_bytes_per_s and request.transport is not None and request.transport.get_extra_info("sslcontext") is None:
            try:
                await _sendfile_body(request, served, start, end, transfer)
                return
            except NotImplementedError:
                pass  # no sendfile here: write from the map below
        await _write_mapped_body(response, served, start + transfer.bytes_sent, end, rate_bytes_per_s, transfer)
    except TimeoutError:
        if transfer.evicted:
            logger.info("%s: its slot for %s was given to a waiting request (see slots.py)", request.remote, served.path.name)
        else:
            logger.info("%s stopped reading %s; closing the connection", request.remote, served.path.name)
        drop_connection(request)
    except ConnectionError:  # the client went away mid-body (aiohttp's ClientConnectionResetError is one)
        logger.info("%s disconnected during %s", request.remote, served.path.name)


async def _sendfile_body(request: web.Request, served: ServedFile, start: int, end: int, transfer: Transfer) -> None:
    """Zero-copy, as aiohttp's FileResponse does, in pieces sized to the client's pace."""
    loop = asyncio.get_running_loop()
    with await asyncio.to_thread(open, served.path, "rb") as f:
        offset = start
        while offset < end:
            size = min(transfer.piece_bytes, end - offset)
            async with transfer.writing(size):
                await loop.sendfile(request.transport, f, offset, size)  # type: ignore[arg-type]
            offset += size


async def _write_mapped_body(
    response: web.StreamResponse, served: ServedFile, start: int, end: int, rate_bytes_per_s: float | None, transfer: Transfer
) -> None:
    """From the file's memory map, paced by a token bucket when the rate is limited."""
    assert served.map is not None
    view = memoryview(served.map)
    bucket = None
    rate_piece = UNTHROTTLED_PIECE_BYTES
    if rate_bytes_per_s:
        rate_piece = int(max(1024, min(64 << 10, rate_bytes_per_s / 50)))  # ~20 ms of link time
        bucket = TokenBucket(rate_bytes_per_s, rate_piece)
    try:
        offset = start
        while offset < end:
            size = min(rate_piece, transfer.piece_bytes, end - offset)
            if bucket is not None:
                await bucket.take(size)
            async with transfer.writing(size):
                await response.write(view[offset : offset + size])
            offset += size
    finally:
        view.release()


def drop_connection(request: web.Request) -> None:
    """Reset a stalled client's connection now: SO_LINGER 0 makes close() discard the queued send buffer
    (megabytes the kernel would otherwise keep trickling into a zero window) and send RST."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
