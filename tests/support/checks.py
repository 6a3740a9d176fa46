"""Assertions and small helpers shared by the client tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

import streamload
from streamload.cache import ModelCache
from tests.support.hosts import Host, HostMissing, start_host
from tests.support.ports import free_port, wait_for_port
from tools._support.caches import assert_cache_exact, assert_layers_equal_file, journal_count

__all__ = [
    "RECEIVE_PATHS",
    "assert_cache_exact",
    "assert_layers_equal_file",
    "journal_count",
    "kill_fetch_once_journaled",
    "open_via",
    "start_cli_server",
    "start_host_or_skip",
    "start_link",
    "start_nginx",
]


def start_cli_server(directory: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """``streamload serve DIR --port PORT [options]`` in its own process, once it accepts connections."""
    command = [sys.executable, "-m", "streamload.cli", "serve", str(directory), "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=15)
    except TimeoutError:
        process.kill()
        process.wait()
        raise
    return process


@contextlib.asynccontextmanager
async def open_via(receive_path: str, url: str, *, check_path: bool = True, **kwargs: object) -> AsyncIterator[streamload.Model]:
    """streamload.open on one of the two HTTP receive paths: pool threads on a plain socket, or aiohttp on the
    event loop (which a borrowed session always takes: it may carry auth headers the plain socket would not send)."""
    async with contextlib.AsyncExitStack() as stack:
        if receive_path == "aiohttp":
            kwargs["session"] = await stack.enter_async_context(aiohttp.ClientSession())
        model = await stack.enter_async_context(streamload.open(url, **kwargs))  # type: ignore[arg-type]
        yield model
        if check_path and model._session.source is not None:  # the path under test is the one that ran
            assert model._session.source.fast_path is (receive_path == "threads")  # type: ignore[attr-defined]


LINKPROXY = Path(__file__).resolve().parents[2] / "tools" / "linkproxy.py"


def start_link(target_port: int, rate_mbit: float, rtt_ms: float) -> tuple[subprocess.Popen[bytes], int]:
    """tools/linkproxy.py in front of a loopback port, in its own process: (process, its port)."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(LINKPROXY),
            "--target",
            f"127.0.0.1:{target_port}",
            "--listen-port",
            str(port),
            "--rate-mbit",
            str(rate_mbit),
            "--rtt-ms",
            str(rtt_ms),
            "--max-seconds",
            "60",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
    except TimeoutError:
        process.kill()
        process.wait()
        raise
    return process, port


def kill_fetch_once_journaled(url: str, cache: Path, digest: str, chunk_count: int) -> dict[int, int]:
    """``streamload fetch URL --quiet`` in its own process, killed (SIGKILL) once the model's journal names a chunk, or
    when 30 s passed or it ended by itself: what the journal holds then (chunk index -> hash of its stored bytes)."""
    process = subprocess.Popen([sys.executable, "-m", "streamload.cli", "fetch", url, "--cache-dir", str(cache), "--quiet"])
    model_cache = ModelCache(cache, digest)
    deadline = time.monotonic() + 30
    while not model_cache.read_journal(chunk_count) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return model_cache.read_journal(chunk_count)


def start_host_or_skip(kind: str, work: Path, root: Path, **options: bool) -> Host:
    """``start_host``, skipped with the package to install when the binary is missing (under CI, a failure)."""
    try:
        return start_host(kind, work, root, **options)
    except HostMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc}: .ci/run installs it")
        pytest.skip(str(exc))


def start_nginx(work: Path, root: Path, ranges: bool) -> tuple[subprocess.Popen[bytes], int]:
    """nginx serving ``root`` (Range honoured, or ``max_ranges 0``): (process, port); skipped when not installed."""
    host = start_host_or_skip("nginx", work, root, ranges=ranges)
    return host.process, host.port


RECEIVE_PATHS = pytest.mark.parametrize("receive_path", ["threads", "aiohttp"])
