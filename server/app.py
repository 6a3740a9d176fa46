"""The bundled model server: .slm files served the way a static host serves them.

GET and HEAD of ``/<name>.slm`` with a strong ETag (the manifest digest),
If-None-Match, single-range requests with If-Range (RFC 9110 section 14, see
``ranges.py``), and ``GET /``, a JSON index. Optional per-connection rate and
latency emulate a phone link. Bodies are written (``body.py``: sendfile, or from a memory
map of the file) in pieces sized to the client's pace; a client that makes no progress
for write_timeout_s is cut off.

Fairness against hostile clients (figures: ``python tools/bench_server_fairness.py``):

- Slots (``slots.py``): at most max_concurrent_requests in flight. While requests
  wait for a slot, each takes back the slot of the blocked transfer that has made no
  progress for longest (at least stall_reclaim_s) and resets its connection, so
  clients that send a GET and never read cannot starve the others. Progress is what
  the peer acknowledges (TCP_INFO). Clients that read slowly but steadily do not stall, so
  waiting requests also take slots from the address holding the most, and, after waiting
  half the queue timeout, from the transfer holding its slot longest (docs/server.md).
- Connections and request heads (``connections.py``): at most max_connections, each head
  at most max_request_line_bytes + max_header_count x max_header_field_bytes.
- Pipelining: aiohttp queues at most 32 parsed requests per connection and then stops
  reading, but answers without a body (HEAD, 304, 416) never wait for the client to
  read them. Before each request the connection's unsent output must drain below
  the transport's high-water mark (64 KiB), under write_timeout_s; so one connection
  holds at most ~64 KiB of answers, 32 queued requests and one read buffer
  (256 KiB) however many requests it pipelines.
- The index (``files.py``) parses each file's manifest once per (size, mtime_ns, inode), in a worker
  thread, and only manifests up to max_indexed_manifest_bytes; others are served as
  bytes and listed with the reason they could not be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..errors import ModelDirectoryError
from .body import drop_connection, write_body
from .connections import ModelRunner
from .files import ModelFiles
from .ranges import RangeOutcome, decide_range
from .slots import SlotPool, Transfer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class ServerConfig:
    """How the server behaves; built once by the CLI or a test."""

    directory: Path  # a str is taken as a path
    rate_bytes_per_s: float | None = None  # per connection; None = unlimited
    latency_ms: float = 0.0  # added before each response's headers: one emulated round trip
    ranges_enabled: bool = True  # False answers every Range with 200 and the whole file (like nginx max_ranges 0)
    max_concurrent_requests: int = 256
    queue_timeout_s: float = 10.0  # a request waiting longer for a slot gets 503 + Retry-After
    write_timeout_s: float = 30.0  # a client whose body makes no progress for this long is disconnected
    stall_reclaim_s: float = 1.0  # while requests wait for a slot, a blocked write without progress this long gives its slot up (slots.py)
    send_buffer_bytes: int | None = None  # SO_SNDBUF per connection (nginx's listen sndbuf=); None keeps the kernel's autotuning
    max_indexed_manifest_bytes: int = 4 << 20  # larger manifests are not parsed: served as bytes, listed as unreadable
    idle_timeout_s: float = 15.0  # a connection without a complete request (slow headers, idle keep-alive) is closed
    # What an unfinished request head may cost (connections.py): at most max_connections open (then the oldest idle
    # one, or the oldest of the busiest address, makes room), each head at most max_request_line_bytes plus
    # max_header_count fields of max_header_field_bytes (name and value): 8 KiB + 32 x 4 KiB = 136 KiB, 68 MiB in all.
    # aiohttp's defaults are 128 fields of 8 KiB (2 MiB per connection) with no bound on connections.
    max_connections: int = 512
    max_request_line_bytes: int = 8190  # the request line: a signed URL's query fits
    max_header_field_bytes: int = 4096  # one header's name and value: a bearer token or a cookie fits
    max_header_count: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(self.directory))


CONFIG = web.AppKey("config", ServerConfig)
FILES = web.AppKey("files", ModelFiles)
SLOTS = web.AppKey("slots", SlotPool)
BUSY = web.AppKey("busy", set)  # the connections (aiohttp protocols) with a request in progress, for connections.py
# The current request's hold on its slot: set by the middleware in the request's own task (aiohttp runs each
# request in a task of its own, with a copy of the context), read by the handler that writes the body.
TRANSFER: contextvars.ContextVar[Transfer] = contextvars.ContextVar("transfer")


def _if_none_match(header: str | None, etag: str) -> bool:
    """RFC 9110 section 13.1.2: weak comparison; ``*`` matches any current representation."""
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or etag in (t.removeprefix("W/") for t in tags)


async def handle_model(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    served = await request.app[FILES].lookup(request.match_info["name"])
    if served is None:
        raise web.HTTPNotFound(text="no such model\n")
    headers = {
        "ETag": served.etag,
        "Last-Modified": served.last_modified,
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes" if config.ranges_enabled else "none",
        "Cache-Control": "public, max-age=300",
    }
    if config.latency_ms:
        await asyncio.sleep(config.latency_ms / 1000)
    if _if_none_match(request.headers.get("If-None-Match"), served.etag):
        return web.Response(status=304, headers=headers)
    decision = decide_range(
        request.headers.get("Range") if config.ranges_enabled else None,
        served.size_bytes,
        if_range=request.headers.get("If-Range"),
        etag=served.etag,
    )
    if decision.outcome is RangeOutcome.BAD_REQUEST:
        raise web.HTTPBadRequest(text="Range header too long\n")
    if decision.outcome is RangeOutcome.UNSATISFIABLE:
        headers["Content-Range"] = f"bytes */{served.size_bytes}"
        # RFC 9110 section 9.3.2: a HEAD answer carries the header fields GET would, Content-Length: 0 included
        headers["Content-Length"] = "0"
        response = web.StreamResponse(status=416, headers=headers)
        await response.prepare(request)
        return response
    status = 200
    if decision.outcome is RangeOutcome.PARTIAL:
        status = 206
        headers["Content-Range"] = f"bytes {decision.start}-{decision.end - 1}/{served.size_bytes}"
    headers["Content-Length"] = str(decision.length)
    response = web.StreamResponse(status=status, headers=headers)
    await response.prepare(request)
    if request.method != "HEAD" and decision.length:
        await write_body(request, response, served, decision.start, decision.end, config.rate_bytes_per_s, TRANSFER.get())
    return response


async def handle_index(request: web.Request) -> web.Response:
    files = request.app[FILES]
    models = []
    for name in files.names():
        served = await files.lookup(name)
        if served is not None:
            models.append(
                {
                    "name": name,
                    "size": served.size_bytes,
                    "architecture": served.architecture,
                    "manifest_digest": served.digest,
                    "error": served.error,
                }
            )
    return web.json_response({"models": models})


@web.middleware
async def limit_concurrency(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Bound what one connection queues, then hold one of max_concurrent_requests slots (503 after queue_timeout_s)."""
    config = request.app[CONFIG]
    try:
        # Answers without a body (HEAD, 304, 416) are written without waiting for the client to read them:
        # a client that pipelines requests and reads nothing would grow our output buffer without bound.
        # Start no request until the connection's earlier answers are below the transport's high-water mark.
        async with asyncio.timeout(config.write_timeout_s):
            await request.writer.drain()
    except TimeoutError:
        drop_connection(request)
        return _client_gone(request, "it pipelines requests without reading the answers; connection closed")
    except ConnectionError as exc:
        return _client_gone(request, str(exc))
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    if config.send_buffer_bytes is not None and sock is not None:
        with contextlib.suppress(OSError):  # caps the bytes a client that stops reading pins in the kernel
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer_bytes)
    slots, busy = request.app[SLOTS], request.app[BUSY]
    transfer = Transfer(config.write_timeout_s, sock, request.remote)
    busy.add(request.protocol)
    try:
        try:
            await slots.acquire(transfer, config.queue_timeout_s)
        except TimeoutError:
            raise web.HTTPServiceUnavailable(headers={"Retry-After": "1"}, text="server busy\n") from None
        TRANSFER.set(transfer)
        try:
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client left while waiting for a slot")
            return await handler(request)
        except ConnectionError as exc:
            return _client_gone(request, str(exc))
        finally:
            slots.release(transfer)
    finally:
        busy.discard(request.protocol)


def _client_gone(request: web.Request, why: str) -> web.Response:
    """The answer for a request whose client is gone: never sent, logged as 499 (nginx's "client closed request")."""
    logger.info("%s %s %s not answered: %s", request.remote, request.method, request.path, why)
    return web.Response(status=499, reason="Client Closed Request")


async def _file_lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    app[FILES] = ModelFiles(config.directory, config.max_indexed_manifest_bytes)
    app[SLOTS] = SlotPool(config.max_concurrent_requests, config.stall_reclaim_s, share_after_s=config.queue_timeout_s / 2)
    yield
    app[SLOTS].close()
    app[FILES].close()


def create_app(config: ServerConfig) -> web.Application:
    """The aiohttp application for one directory of models.

    Raises:
        ModelDirectoryError: ``config.directory`` is not a directory (also a ``NotADirectoryError``).

    Example:
        >>> app = create_app(ServerConfig(directory=Path("models")))   # doctest: +SKIP
        >>> web.run_app(app, host="127.0.0.1", port=8800)              # doctest: +SKIP
    """
    if not config.directory.is_dir():
        raise ModelDirectoryError(f"{config.directory} is not a directory")
    header_limits = {
        "max_line_size": config.max_request_line_bytes,
        "max_field_size": config.max_header_field_bytes,
        "max_headers": config.max_header_count,
    }
    app = web.Application(middlewares=[limit_concurrency], handler_args=header_limits)
    app[CONFIG] = config
    app[BUSY] = set()
    app.cleanup_ctx.append(_file_lifecycle)
    app.router.add_get("/", handle_index)
    app.router.add_get("/{name}", handle_model)
    return app


class AccessLogger(AbstractAccessLogger):
    """One line per request; the size is the body's Content-Length (sendfile bypasses aiohttp's byte count)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        size = response.headers.get("Content-Length", str(response.body_length))
        self.logger.info(
            '%s "%s %s" %d %s %.4fs range=%s',
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            size,
            time,
            request.headers.get("Range", "-"),
        )


def create_runner(app: web.Application, **options: object) -> web.AppRunner:
    """The runner for an app of ``create_app``: its sites hold at most max_connections (``connections.py``).
    ``options`` go to ``web.AppRunner`` after ``runner_options``."""
    config = app[CONFIG]
    return ModelRunner(app, max_connections=config.max_connections, busy=app[BUSY], **{**runner_options(config), **options})


def runner_options(config: ServerConfig) -> dict[str, object]:
    """Options for ``web.AppRunner`` / ``web.run_app``: aiohttp closes a connection that has not sent a complete
    request within keepalive_timeout (its timer starts at connect), which is our defence against slow headers."""
    return {"keepalive_timeout": config.idle_timeout_s}


def run_server(
    config: ServerConfig,
    host: str = "127.0.0.1",
    port: int = 8800,
    *,
    announce: Callable[[str], None] = print,
    access_log: bool = True,
    sock: socket.socket | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then close connections and exit cleanly.

    ``announce`` gets one line with the address actually bound (port 0 takes a free port). ``sock``: a listening
    socket bound already (the CLI binds before it imports this module, so a port in use is said at once); host and
    port are then only named in the announcement.

    Raises:
        OSError: the address cannot be bound (the port is in use, the host does not resolve).
    """
    asyncio.run(_serve_until_signalled(config, host, port, announce, access_log, sock))


async def _serve_until_signalled(
    config: ServerConfig, host: str, port: int, announce: Callable[[str], None], access_log: bool, sock: socket.socket | None
) -> None:
    """``web.run_app`` without its banner: the bound port is read back from the socket, so ``--port 0`` can say which."""
    runner = create_runner(
        create_app(config),
        access_log=logging.getLogger("streamload.server.access") if access_log else None,
        access_log_class=AccessLogger,
        shutdown_timeout=0.5,  # Ctrl-C or SIGTERM: transfers in flight (a throttled one sleeps) get this long, then are closed
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # before the announcement: whoever reads it may stop us at once
        loop.add_signal_handler(signum, stop.set)
    await runner.setup()
    try:
        await (web.TCPSite(runner, host, port) if sock is None else web.SockSite(runner, sock)).start()
        bound_port = runner.addresses[0][1]
        announce(f"serving {config.directory} on http://{host}:{bound_port}/ (Ctrl-C to stop)")
        await stop.wait()
    finally:
        await runner.cleanup()
