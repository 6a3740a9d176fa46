"""Run an aiohttp app on a free loopback port in a background thread (usable from sync and async tests)."""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from pathlib import Path

from aiohttp import web

from streamload.server import ServerConfig, create_app, create_runner
from streamload.server.app import CONFIG


class ServerThread:
    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.runner = create_runner(self.app, shutdown_timeout=0.5) if CONFIG in self.app else web.AppRunner(self.app, shutdown_timeout=0.5)
        self._loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.runner.cleanup())
        self._loop.close()

    def url(self, name: str = "") -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}/{name}"

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("test server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_directory(directory: Path, **options: object) -> ServerThread:
    return ServerThread(create_app(ServerConfig(directory=directory, **options)))  # type: ignore[arg-type]


def serve_files(directory: Path, *, ranges: bool = True) -> ServerThread:
    """A static host that serves whatever bytes a file holds, as nginx or a CDN would (the bundled server refuses files
    that are not models): for tests of the client's own defences against a hostile file. ``ranges``: answer a
    ``bytes=START-[END]`` Range with 206, else always the whole file with 200."""

    async def handle(request: web.Request) -> web.StreamResponse:
        path = directory / request.match_info["name"]
        if not path.is_file():
            raise web.HTTPNotFound()
        data = path.read_bytes()
        found = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "")) if ranges else None
        if found is None or int(found.group(1)) >= len(data):
            return web.Response(body=data, headers={"Accept-Ranges": "bytes" if ranges else "none"})
        start = int(found.group(1))
        end = min(len(data), int(found.group(2)) + 1) if found.group(2) else len(data)
        headers = {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}", "Accept-Ranges": "bytes"}
        return web.Response(status=206, body=data[start:end], headers=headers)

    app = web.Application()
    app.router.add_get("/{name}", handle)
    return ServerThread(app)
