"""https: the threaded receive path over TLS, against the bundled server app with a certificate from a test CA."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from streamload.formats import ModelReader
from streamload.server import ServerConfig, create_app
from streamload.transport.httputil import RetryPolicy
from streamload.transport.rawhttp import open_socket_span
from tests.support.checks import assert_cache_exact
from tests.support.serving import ServerThread


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def https_server(ca: trustme.CA, deep_slm: Path) -> Iterator[tuple[ServerThread, list[tuple[str | None, str]]]]:
    """The bundled server's app over TLS; records (Range, User-Agent) of every request."""
    seen: list[tuple[str | None, str]] = []

    @web.middleware
    async def record(request: web.Request, handler):  # noqa: ANN001, ANN202
        seen.append((request.headers.get("Range"), request.headers.get("User-Agent", "")))
        return await handler(request)

    app = create_app(ServerConfig(directory=deep_slm.parent))
    app.middlewares.append(record)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with ServerThread(app, ssl_context=context) as server:
        yield server, seen


POLICY = RetryPolicy(connect_timeout_s=5, stall_timeout_s=10)


async def test_a_ranged_body_is_read_over_tls(ca: trustme.CA, https_server: tuple[ServerThread, list], deep_slm: Path) -> None:
    server, _ = https_server
    client = ssl.create_default_context()
    ca.configure_trust(client)
    data = deep_slm.read_bytes()
    start, end = 1000, len(data) - 7
    stream = await open_socket_span(server.url("deep.slm"), start, end, etag=None, policy=POLICY, ssl_context=client)
    try:
        pieces = [bytearray(size) for size in (100, 65536, end - start - 65636)]
        offsets = [start, start + 100, start + 65636]
        await asyncio.to_thread(
            lambda: [stream.read_into(offset, memoryview(piece)) for offset, piece in zip(offsets, pieces, strict=True)]
        )
    finally:
        stream.close()
    assert b"".join(pieces) == data[start:end] and stream.total_size_bytes == len(data)


async def test_a_certificate_from_an_unknown_ca_is_refused(https_server: tuple[ServerThread, list]) -> None:
    server, _ = https_server
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_socket_span(server.url("deep.slm"), 0, 100, etag=None, policy=POLICY, ssl_context=ssl.create_default_context())


def test_fetch_over_https_receives_on_the_threaded_path(
    ca: trustme.CA, https_server: tuple[ServerThread, list], deep_slm: Path, tmp_path: Path
) -> None:
    server, seen = https_server
    seen.clear()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env = {**os.environ, "SSL_CERT_FILE": str(tmp_path / "ca.pem")}  # trusted by both aiohttp (header) and the fast path
    result = subprocess.run(
        [sys.executable, "-m", "streamload.cli", "fetch", server.url("deep.slm"), "--cache-dir", str(tmp_path / "cache"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    report = json.loads(result.stdout)
    with ModelReader(deep_slm) as reader:
        assert report["chunks_fetched"] == len(reader.manifest.chunks)
    assert seen == [("bytes=0-", "streamload")]  # one request carried header and data, over the threaded path
    assert_cache_exact(tmp_path / "cache", deep_slm)
