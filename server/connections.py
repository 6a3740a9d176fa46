"""How many connections the server holds, and which one gives way when a new one comes and there is no room.

Every connection costs memory while it sends its request head: aiohttp keeps the header lines received so far
(bounded per connection by ``ServerConfig``'s header limits: max_request_line_bytes + max_header_count x
max_header_field_bytes, 136 KiB by default) until the head is complete or the idle timeout closes it. Bounding the
number of connections (max_connections, 512 by default, like nginx's worker_connections) bounds that memory:
about 512 x 136 KiB = 68 MiB of heads at most, and then the Python objects the parser made of them.

When a connection arrives and max_connections are open, one of them is closed to make room (``ConnectionBudget``):

1. the oldest connection with no request in progress (an unfinished head, or an idle keep-alive connection): it
   loses nothing a client cannot send again;
2. else the oldest connection of the peer address that holds the most connections: one client that opens them all
   makes room for the others out of its own, and a client that is cut off mid-body resumes with a Range request.

Reads: a connection's socket is read in pieces of READ_BYTES (asyncio's default is 256 KiB). The server reads only
request heads, which fit, and a client that floods its head is refused at its first line over the limits: with 256
KiB reads, 1000 connections each sending 1 MB of header lines took the server from 51 to 661 MiB, with 16 KiB reads
to 118 MiB (``python tools/bench_server_fairness.py --only-heads``).

Runs on the event loop (``__call__`` is asyncio's protocol factory: one call per accepted connection, O(connections)).
"""

from __future__ import annotations

import asyncio
import collections
import logging

from aiohttp import web

from .slots import client_key

logger = logging.getLogger(__name__)

READ_BYTES = 16 << 10  # per recv(2): a request head fits; asyncio's 256 KiB per connection is what a flood of heads costs
SERVER_FULL = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class ConnectionBudget:
    """asyncio's protocol factory for the server's sockets: at most ``max_connections`` open at once (module doc)."""

    def __init__(self, server: web.Server, max_connections: int, busy: set[object]) -> None:
        self.server = server
        self.max_connections = max_connections
        self.busy = busy  # protocols with a request in progress (kept by the app's middleware)
        self.closed_for_room = 0
        # the connections this factory made and not yet lost, oldest first (asyncio accepts a burst of connections
        # before any of them is made: web.Server's own list lags behind)
        self._open: dict[_HeadSizedHandler, None] = {}

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._open) >= self.max_connections:
            made = [handler for handler in self._open if handler.transport is not None]
            victim = next((handler for handler in made if handler not in self.busy), None) or _oldest_of_busiest_peer(made)
            if victim is None:
                return _Refusal()
            logger.info(
                "%d connections open, the limit: closing the oldest %s to make room",
                len(self._open),
                "idle one" if victim not in self.busy else "of the address holding the most",
            )
            self.closed_for_room += 1
            self.forget(victim)
            transport = victim.transport
            victim.force_close()
            if victim in self.busy and transport is not None:
                transport.abort()  # close() would wait for its unsent answer to drain, which a non-reader never lets happen
        # web.Server.__call__, with the handler that reads in READ_BYTES pieces and says when it is lost
        handler = _HeadSizedHandler(self, self.server, loop=self.server._loop, **self.server._kwargs)
        self._open[handler] = None
        return handler

    def forget(self, handler: _HeadSizedHandler) -> None:
        self._open.pop(handler, None)

    def __getattr__(self, name: str) -> object:
        return getattr(self.server, name)  # the rest of web.Server's interface, for whoever asks the runner for it


def _oldest_of_busiest_peer(handlers: list[_HeadSizedHandler]) -> _HeadSizedHandler | None:
    """The oldest connection of the peer address with the most connections open."""
    by_address: dict[str | None, list[_HeadSizedHandler]] = collections.defaultdict(list)
    for handler in handlers:
        transport = handler.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        by_address[client_key(peer[0]) if peer else "?"].append(handler)
    if not by_address:
        return None
    return max(by_address.values(), key=len)[0]


class _HeadSizedHandler(web.RequestHandler):
    """aiohttp's handler on a transport that reads READ_BYTES at a time (a selector transport's ``max_size``), which
    tells its budget when its connection is lost."""

    __slots__ = ("_budget",)

    def __init__(self, budget: ConnectionBudget, manager: web.Server, **kwargs: object) -> None:
        super().__init__(manager, **kwargs)  # type: ignore[arg-type]
        self._budget = budget

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(getattr(transport, "max_size", None), int):
            transport.max_size = READ_BYTES  # type: ignore[attr-defined]
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._budget.forget(self)
        super().connection_lost(exc)


class _Refusal(asyncio.Protocol):
    """A connection there is no room for: 503 with Retry-After, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(SERVER_FULL)
        transport.close()


class ModelRunner(web.AppRunner):
    """``web.AppRunner`` whose sites (TCPSite, SockSite) accept connections through a ``ConnectionBudget``."""

    def __init__(self, app: web.Application, *, max_connections: int, busy: set[object], **kwargs: object) -> None:
        super().__init__(app, **kwargs)  # type: ignore[arg-type]
        self._max_connections = max_connections
        self._busy = busy
        self._budget: ConnectionBudget | None = None

    @property
    def server(self) -> web.Server | None:
        server = super().server
        if server is None:
            return None
        if self._budget is None or self._budget.server is not server:
            self._budget = ConnectionBudget(server, self._max_connections, self._busy)
        return self._budget  # type: ignore[return-value]
