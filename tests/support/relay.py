"""A paced TCP relay to a loopback port that counts the bytes coming back: how much has passed a point."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class CountingRelay:
    """Listens on a free loopback port and relays to ``target_port``; the answers share one link of
    ``rate_bytes_per_s`` (None: unpaced); ``bytes_down`` is what has come back through it so far."""

    def __init__(self, target_port: int, rate_bytes_per_s: float | None) -> None:
        self.target_port = target_port
        self.rate = rate_bytes_per_s
        self.bytes_down = 0
        self.port = 0
        self._next_free = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        with contextlib.suppress(BaseException):
            self._loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(self._loop), return_exceptions=True))
        self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return

        async def up() -> None:
            while data := await client_reader.read(64 << 10):
                server_writer.write(data)
                await server_writer.drain()

        async def down() -> None:
            while data := await server_reader.read(16 << 10):
                if self.rate:
                    now = time.monotonic()
                    self._next_free = max(now, self._next_free) + len(data) / self.rate
                    await asyncio.sleep(self._next_free - now)
                self.bytes_down += len(data)
                client_writer.write(data)
                await client_writer.drain()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.CancelledError):  # a side closed, or the relay stops: asyncio logs a handler that raises
            pass
        finally:
            for writer in (server_writer, client_writer):
                writer.close()

    def __enter__(self) -> CountingRelay:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
