"""The threaded socket path's ranged GET (streamload/transport/rawhttp.py) against scripted servers on loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator

import pytest

from streamload.errors import RetryableError, StalledError
from streamload.transport.httputil import RetryPolicy, TransportStatus, TransportUnsupported
from streamload.transport.rawhttp import SocketReader, open_socket_span

BODY = bytes(range(256)) * 64  # 16 KiB


@dataclasses.dataclass
class Script:
    """What the server answers: a head, then body pieces (None: stall until the client goes away), then close."""

    head: bytes
    pieces: list[bytes | None]
    requests: list[bytes] = dataclasses.field(default_factory=list)


def head_206(start: int, end: int, total: int = 1 << 20, **extra: str) -> bytes:
    lines = [
        "HTTP/1.1 206 Partial Content",
        f"Content-Range: bytes {start}-{end - 1}/{total}",
        f"Content-Length: {end - start}",
        'ETag: "abc"',
    ]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in extra.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        script.requests.append(await reader.readuntil(b"\r\n\r\n"))
        try:
            writer.write(script.head + (script.pieces[0] or b""))  # the first piece arrives with the head
            await writer.drain()
            for piece in script.pieces[1:]:
                if piece is None:
                    await reader.read()  # stall: send nothing until the client closes
                    return
                await asyncio.sleep(0.05)
                writer.write(piece)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/model.slm"


async def open_range(
    url: str, start: int, end: int, *, if_range: str | None = None, read_timeout_s: float = 10.0, **policy: float
) -> SocketReader:
    return await open_socket_span(
        url, start, end, etag=if_range, policy=RetryPolicy(connect_timeout_s=5.0, stall_timeout_s=read_timeout_s, **policy)
    )


async def test_a_206_body_is_read_in_order_including_the_bytes_that_came_with_the_head() -> None:
    body = BODY[: 3 * 4096]
    script = Script(head_206(100, 100 + len(body)), [body[:1000], body[1000:5000], body[5000:]])
    async with scripted(script) as url:
        stream = await open_range(url, 100, 100 + len(body), if_range='"abc"')
        try:
            parts = [bytearray(500), bytearray(4096), bytearray(len(body) - 4596)]
            offsets = [100, 600, 4696]
            await asyncio.to_thread(
                lambda: [stream.read_into(offset, memoryview(part)) for offset, part in zip(offsets, parts, strict=True)]
            )
        finally:
            stream.close()
    assert b"".join(parts) == body
    assert stream.total_size_bytes == 1 << 20 and stream.etag == '"abc"'
    request = script.requests[0].decode()
    assert request.startswith("GET /model.slm HTTP/1.1\r\n")
    assert f"Range: bytes=100-{100 + len(body) - 1}\r\n" in request and 'If-Range: "abc"\r\n' in request


async def test_a_weak_etag_is_never_sent_as_if_range() -> None:
    script = Script(head_206(0, 10), [BODY[:10]])
    async with scripted(script) as url:
        (await open_range(url, 0, 10, if_range='W/"abc"')).close()
    assert b"If-Range" not in script.requests[0]


async def test_a_200_to_an_open_range_from_byte_0_is_a_whole_file_body_on_this_path() -> None:
    """A server that ignores Range answers "bytes=0-" with the whole file: the same bytes, read here (no second
    request through the general client); an encoded or unsized 200 still goes there."""
    script = Script(f"HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\n\r\n".encode(), [BODY[:1000], BODY[1000:]])
    async with scripted(script) as url:
        stream = await open_socket_span(url, 0, None, etag=None, policy=RetryPolicy(connect_timeout_s=5.0))
        try:
            whole = bytearray(len(BODY))
            await asyncio.to_thread(stream.read_into, 0, memoryview(whole))
        finally:
            stream.close()
    assert whole == BODY and stream.whole_file and stream.total_size_bytes == len(BODY)
    assert "Range: bytes=0-\r\n" in script.requests[0].decode()
    for head in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"):
        async with scripted(Script(head, [b""])) as url:
            with pytest.raises(TransportUnsupported):
                await open_socket_span(url, 0, None, etag=None, policy=RetryPolicy(connect_timeout_s=5.0))


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n",  # Range ignored: the whole file
        head_206(0, 64),  # another range than asked for
        head_206(100, 164, Transfer_Encoding="chunked"),
        head_206(100, 164, Content_Encoding="gzip"),
        head_206(100, 164).replace(b"Content-Length: 64", b"Content-Length: 63"),
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 64\r\n\r\n",  # no Content-Range
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
    ],
)
async def test_anything_but_the_plain_206_asked_for_is_unsupported(head: bytes) -> None:
    async with scripted(Script(head, [b""])) as url:
        with pytest.raises(TransportUnsupported):
            await open_range(url, 100, 164)


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1/m.slm", "http://user:secret@127.0.0.1:1/m.slm", "https://user@127.0.0.1:1/m.slm"])
async def test_other_schemes_and_credentials_go_to_the_general_client(url: str) -> None:
    with pytest.raises(TransportUnsupported):
        await open_range(url, 0, 10)


async def test_an_error_status_carries_retry_after() -> None:
    async with scripted(Script(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n", [b""])) as url:
        with pytest.raises(TransportStatus) as info:
            await open_range(url, 0, 10)
    assert info.value.status == 503 and info.value.retry_after == "7"


async def test_a_server_closing_mid_body_is_a_connection_error() -> None:
    async with scripted(Script(head_206(0, 4096), [BODY[:1000]])) as url:
        stream = await open_range(url, 0, 4096)
        try:
            with pytest.raises(RetryableError, match="mid-body"):
                await asyncio.to_thread(stream.read_into, 0, memoryview(bytearray(4096)))
        finally:
            stream.close()


async def test_a_stalled_body_times_out() -> None:
    async with scripted(Script(head_206(0, 4096), [BODY[:1000], None])) as url:
        stream = await open_range(url, 0, 4096, read_timeout_s=0.3)
        try:
            with pytest.raises(StalledError):  # a hang would end in wait_for's TimeoutError instead
                await asyncio.wait_for(asyncio.to_thread(stream.read_into, 0, memoryview(bytearray(4096))), 60)
        finally:
            stream.close()


async def test_abort_wakes_a_reader_blocked_on_a_stalled_body_at_once() -> None:
    async with scripted(Script(head_206(0, 4096), [BODY[:1000], None])) as url:
        stream = await open_range(url, 0, 4096, read_timeout_s=30.0)
        failure: list[BaseException] = []
        blocked = threading.Event()

        def read() -> None:
            blocked.set()
            try:
                stream.read_into(0, memoryview(bytearray(4096)))
            except RetryableError as exc:
                failure.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        await asyncio.to_thread(blocked.wait)
        await asyncio.sleep(0.2)  # the reader is inside recv now, 30 s from its timeout
        stream.abort()
        await asyncio.to_thread(reader.join, 15)  # a guard, well inside the 30 s the read timeout would take
        stream.close()
    assert not reader.is_alive()
    assert len(failure) == 1 and "mid-body" in str(failure[0])


async def test_a_body_that_trickles_below_the_minimum_rate_is_stalled() -> None:
    """One byte every 50 ms never trips the per-read timeout; the rate window does."""
    pieces: list[bytes | None] = [b""] + [BODY[i : i + 1] for i in range(60)]
    async with scripted(Script(head_206(0, 4096), pieces)) as url:
        stream = await open_range(url, 0, 4096, read_timeout_s=5.0, min_rate_bytes_per_s=100.0, rate_window_s=0.5)
        try:
            with pytest.raises(StalledError, match="minimum rate"):  # not the end of the 3 s trickle, which is mid-body
                await asyncio.to_thread(stream.read_into, 0, memoryview(bytearray(4096)))
        finally:
            stream.close()


async def test_a_response_head_that_trickles_in_hits_the_header_deadline() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 206 Partial Content\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # one header line every 0.1 s: each read succeeds, the head never ends
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/m.slm"
        with pytest.raises(TimeoutError, match="no complete response head within 0.6 s"):  # not the 5 s read timeout
            await open_range(url, 0, 10, read_timeout_s=5.0, header_timeout_s=0.6)
