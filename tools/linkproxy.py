"""A phone-like link in front of any loopback HTTP server: bandwidth and round-trip latency.

Usage:
    python tools/linkproxy.py --target 127.0.0.1:8800 --listen-port 9000 --rate-mbit 20 --rtt-ms 50 [--max-seconds 3600]
        [--count-file FILE]   # FILE holds the bytes delivered downstream so far, rewritten as each connection ends

All connections share one downstream link of --rate-mbit (a token bucket, as a real
bottleneck link is shared); each direction adds RTT/2 of delay, so a request costs one
RTT before its first byte. Queues are bounded (the proxy stops reading a side whose
bytes are not yet delivered), so memory stays small. It binds to 127.0.0.1, forwards
only to loopback targets, and exits after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import os
import time

PIECE_BYTES = 16 << 10
QUEUE_LIMIT_BYTES = 256 << 10


class TokenBucket:
    """Shared pacing for one link direction."""

    def __init__(self, rate_bytes_per_s: float | None) -> None:
        self.rate = rate_bytes_per_s
        self.next_free = time.monotonic()

    def schedule(self, size_bytes: int) -> float:
        """The time this piece finishes serialising onto the link (pieces queue behind each other)."""
        now = time.monotonic()
        if not self.rate:
            return now
        start = max(now, self.next_free)
        self.next_free = start + size_bytes / self.rate
        return self.next_free


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: TokenBucket, delay_s: float, counter: list[int] | None = None
) -> None:
    """Copy one direction: serialise at the link rate, deliver delay_s later, bounded queue."""
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    queued = 0
    arrived = asyncio.Event()
    finished = False

    async def deliver() -> None:
        nonlocal queued
        while True:
            while not queue:
                if finished:
                    return
                arrived.clear()
                await arrived.wait()
            due, data = queue[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            queue.popleft()
            queued -= len(data)
            if counter is not None:
                counter[0] += len(data)
            writer.write(data)
            await writer.drain()
            arrived.set()

    delivery = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(PIECE_BYTES)
            if not data:
                break
            queue.append((link.schedule(len(data)) + delay_s, data))
            queued += len(data)
            arrived.set()
            while queued > QUEUE_LIMIT_BYTES and not delivery.done():
                arrived.clear()
                await arrived.wait()
    except (ConnectionError, OSError):
        pass
    finally:
        finished = True
        arrived.set()
        with contextlib.suppress(ConnectionError, OSError):
            await delivery
        with contextlib.suppress(ConnectionError, OSError):
            if writer.can_write_eof():
                writer.write_eof()


class Link:
    """The proxy: one shared downstream bucket, per-connection pumps."""

    def __init__(
        self, target_host: str, target_port: int, rate_bytes_per_s: float | None, rtt_s: float, count_file: str | None = None
    ) -> None:
        if not ipaddress.ip_address(target_host).is_loopback:
            raise SystemExit(f"refusing to forward to {target_host}: loopback targets only")
        self.target = (target_host, target_port)
        self.down = TokenBucket(rate_bytes_per_s)
        self.up = TokenBucket(None)
        self.one_way_s = rtt_s / 2
        self.delivered = [0]  # bytes delivered downstream, all connections
        self.count_file = count_file

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        try:
            await asyncio.gather(
                pump(client_reader, server_writer, self.up, self.one_way_s),
                pump(server_reader, client_writer, self.down, self.one_way_s, self.delivered),
            )
        finally:
            for w in (server_writer, client_writer):
                w.close()
            if self.count_file:
                with open(self.count_file + ".tmp", "w") as f:
                    f.write(str(self.delivered[0]))
                os.replace(self.count_file + ".tmp", self.count_file)


async def serve(link: Link, port: int, max_seconds: float, ready: asyncio.Event | None = None) -> None:
    server = await asyncio.start_server(link.handle, "127.0.0.1", port)
    if ready is not None:
        ready.set()
    async with server:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max_seconds):
                await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of the server (loopback)")
    parser.add_argument("--listen-port", type=int, required=True)
    parser.add_argument("--rate-mbit", type=float, help="downstream link rate in Mbit/s (default: unlimited)")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="exit after this long, whatever happens")
    parser.add_argument("--count-file", help="write the bytes delivered downstream so far to this file as each connection ends")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    link = Link(host, int(port), args.rate_mbit * 1e6 / 8 if args.rate_mbit else None, args.rtt_ms / 1000, args.count_file)
    print(
        f"link on 127.0.0.1:{args.listen_port} -> {args.target}: {args.rate_mbit or 'unlimited'} Mbit/s, RTT {args.rtt_ms} ms", flush=True
    )
    asyncio.run(serve(link, args.listen_port, args.max_seconds))


if __name__ == "__main__":
    main()
