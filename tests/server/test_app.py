"""The bundled server over real loopback sockets."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from streamload.errors import ModelDirectoryError
from streamload.formats import ModelReader
from streamload.formats.reader import encode_preamble
from streamload.server import ServerConfig, create_app
from tests.support.serving import ServerThread, serve_directory


@pytest.fixture
def model_dir(tmp_path: Path, llama_slm: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    (directory / "llama.slm").write_bytes(llama_slm.read_bytes())
    (tmp_path / "secret.slm").write_bytes(b"outside the served directory")
    os.symlink(tmp_path / "secret.slm", directory / "escape.slm")
    (directory / "notes.txt").write_text("not a model")
    return directory


@pytest.fixture
def server(model_dir: Path) -> Iterator[ServerThread]:
    with serve_directory(model_dir) as running:
        yield running


async def get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.request(method, url, headers=headers or {}) as response:
            return response.status, CIMultiDict(response.headers), await response.read()


async def test_whole_file_and_headers(server: ServerThread, model_dir: Path) -> None:
    data = (model_dir / "llama.slm").read_bytes()
    status, headers, body = await get(server.url("llama.slm"))
    assert status == 200 and body == data
    with ModelReader(model_dir / "llama.slm") as reader:
        assert headers["ETag"] == f'"{reader.manifest.digest}"'
    assert headers["Accept-Ranges"] == "bytes" and headers["Content-Length"] == str(len(data))
    status, headers, body = await get(server.url("llama.slm"), method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(data))


async def test_ranges_and_conditionals(server: ServerThread, model_dir: Path) -> None:
    data = (model_dir / "llama.slm").read_bytes()
    status, headers, body = await get(server.url("llama.slm"), {"Range": "bytes=10-19"})
    assert (status, body, headers["Content-Range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
    status, headers, body = await get(server.url("llama.slm"), {"Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, headers, _ = await get(server.url("llama.slm"), {"Range": f"bytes={len(data)}-"})
    assert (status, headers["Content-Range"]) == (416, f"bytes */{len(data)}")
    etag = headers["ETag"]
    status, _, body = await get(server.url("llama.slm"), {"Range": "bytes=0-3", "If-Range": etag})
    assert (status, body) == (206, data[:4])
    status, _, body = await get(server.url("llama.slm"), {"Range": "bytes=0-3", "If-Range": '"stale"'})
    assert (status, body) == (200, data)
    status, _, body = await get(server.url("llama.slm"), {"If-None-Match": etag})
    assert (status, body) == (304, b"")
    status, _, _ = await get(server.url("llama.slm"), {"Range": "bytes=" + "1-2," * 500})
    assert status == 400


def raw_exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send one request on a fresh socket and read to EOF: the status line, the headers as sent, the rest."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def test_a_last_byte_past_the_end_is_clamped_and_416_answers_say_content_length_0(server: ServerThread, model_dir: Path) -> None:
    data = (model_dir / "llama.slm").read_bytes()
    status, headers, body = raw_exchange(
        server.port, b"GET /llama.slm HTTP/1.1\r\nHost: x\r\nRange: bytes=0-99999999999999999999\r\nConnection: close\r\n\r\n"
    )
    assert status.startswith("HTTP/1.1 206") and headers["content-range"] == f"bytes 0-{len(data) - 1}/{len(data)}" and body == data
    for method in ("GET", "HEAD"):  # RFC 9110 section 9.3.2: HEAD answers with the fields GET would send
        request = f"{method} /llama.slm HTTP/1.1\r\nHost: x\r\nRange: bytes={len(data)}-\r\nConnection: close\r\n\r\n".encode()
        status, headers, body = raw_exchange(server.port, request)
        assert status.startswith("HTTP/1.1 416") and headers["content-length"] == "0" and body == b""
        assert headers["content-range"] == f"bytes */{len(data)}"


@pytest.mark.parametrize(
    "path",
    [
        "../secret.slm",
        "%2e%2e/secret.slm",
        "..%2fsecret.slm",
        "%2e%2e%2fsecret.slm",
        "escape.slm",
        "notes.txt",
        "missing.slm",
        ".hidden.slm",
        "%2ftmp%2fx.slm",
    ],
)
async def test_only_models_directly_in_the_directory_are_reachable(server: ServerThread, path: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url(path), allow_redirects=False) as response:  # sent as written, not normalised
            assert response.status == 404


async def test_index_lists_models(server: ServerThread, model_dir: Path) -> None:
    status, _, body = await get(server.url())
    listing = json.loads(body)["models"]
    names = [m["name"] for m in listing]
    assert names == ["llama.slm"]  # the symlink out of the directory and the .txt file are not listed
    llama = next(m for m in listing if m["name"] == "llama.slm")
    assert llama["architecture"] == "llama" and llama["size"] == (model_dir / "llama.slm").stat().st_size


def write_manifest_bomb(path: Path, manifest_size_bytes: int) -> None:
    """A .slm whose manifest is one unknown key holding ~manifest_size_bytes empty msgpack maps (~64 B of Python each)."""
    count = manifest_size_bytes - 9
    manifest = b"\x81\xa3bom\xdd" + count.to_bytes(4, "big") + b"\x80" * count  # {"bom": [{}, {}, ...]}
    preamble = encode_preamble(len(manifest))
    path.write_bytes(preamble + manifest + bytes(-(len(preamble) + len(manifest)) % 64))


async def test_index_lists_hostile_files_as_unreadable_without_parsing_them(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_manifest_bomb(model_dir / "bomb.slm", 8 << 20)  # parsed, this costs ~600 MB and ~1 s
    (model_dir / "absurd.slm").write_bytes(encode_preamble(60 << 20) + bytes(1000))  # declares a 60 MiB manifest in 1 KB
    with serve_directory(model_dir) as server:
        status, _, body = await get(server.url())
        listing = {m["name"]: m for m in json.loads(body)["models"]}
        status_bomb, _, bomb_bytes = await get(server.url("bomb.slm"))  # still served as bytes
    assert status == 200
    # the limit is checked on the preamble's declared size, before any parsing: this error is the one without a parse
    assert "over the server's limit" in listing["bomb.slm"]["error"] and listing["bomb.slm"]["architecture"] is None
    assert listing["absurd.slm"]["error"] and listing["llama.slm"]["error"] is None and listing["llama.slm"]["architecture"] == "llama"
    assert status_bomb == 200 and bomb_bytes == (model_dir / "bomb.slm").read_bytes()
    assert any("bomb.slm is not a readable model file" in r.getMessage() for r in caplog.records)


async def test_index_reads_each_file_once_per_version(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="streamload.server.files")
    path = model_dir / "llama.slm"

    def reads() -> int:
        return sum(r.getMessage() == "reading the manifest of llama.slm" for r in caplog.records)

    with serve_directory(model_dir) as server:
        for _ in range(3):
            status, _, body = await get(server.url())
            assert status == 200 and json.loads(body)["models"][0]["architecture"] == "llama"
        reads_of_one_version = reads()
        # Another file under the same name, size and mtime (rsync -t, cp -p then mv): only the inode tells.
        before = path.stat()
        replacement = model_dir / "replacement.tmp"
        replacement.write_bytes(bytes(before.st_size))
        os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.replace(replacement, path)
        _, _, body = await get(server.url())
    assert json.loads(body)["models"] == []  # zeros are no model: not the stale entry of the file it replaced
    assert (reads_of_one_version, reads()) == (1, 2)


async def test_rate_limit_paces_the_body(model_dir: Path) -> None:
    size = (model_dir / "llama.slm").stat().st_size
    rate = size / 0.5  # the whole file should take at least ~0.5 s
    with serve_directory(model_dir, rate_bytes_per_s=rate, latency_ms=50) as server:
        started = time.perf_counter()
        status, _, body = await get(server.url("llama.slm"))
        elapsed = time.perf_counter() - started
    assert status == 200 and len(body) == size
    assert elapsed >= 0.4  # a lower bound only: a busy machine can be slower, never faster


async def test_ranges_can_be_turned_off(model_dir: Path) -> None:
    with serve_directory(model_dir, ranges_enabled=False) as server:
        status, headers, body = await get(server.url("llama.slm"), {"Range": "bytes=0-9"})
    assert status == 200 and len(body) == (model_dir / "llama.slm").stat().st_size and headers["Accept-Ranges"] == "none"


def test_slow_clients_are_cut_off(model_dir: Path) -> None:
    import socket

    with serve_directory(model_dir, idle_timeout_s=0.5, write_timeout_s=0.5) as server:
        slow_headers = socket.create_connection(("127.0.0.1", server.port))
        slow_headers.sendall(b"GET /llama.slm HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        slow_headers.settimeout(10)  # a guard against a hang, inside the default 15 s idle timeout that would close it too
        assert slow_headers.recv(100) == b""  # closed by the server
        big = model_dir / "big.slm"
        big.write_bytes(
            encode_preamble(8 << 20) + bytes(64 << 20)
        )  # larger than the socket buffers; served unread (its manifest is too large)
        not_reading = socket.create_connection(("127.0.0.1", server.port))
        not_reading.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        not_reading.sendall(b"GET /big.slm HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(2.0)  # reads nothing; the server gives up on it
        not_reading.settimeout(10)
        received = 0
        with pytest.raises(ConnectionResetError):  # reset, its queued bytes discarded
            while chunk := not_reading.recv(1 << 20):
                received += len(chunk)
        assert received < 64 << 20
        with socket.create_connection(("127.0.0.1", server.port)) as fine:  # the server still serves others
            fine.sendall(b"HEAD /llama.slm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert fine.recv(100).startswith(b"HTTP/1.1 200")


async def test_200_concurrent_clients_get_byte_exact_files(model_dir: Path) -> None:
    import asyncio
    import hashlib

    expected = hashlib.sha256((model_dir / "llama.slm").read_bytes()).hexdigest()
    with serve_directory(model_dir) as server:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

            async def fetch_one(i: int) -> str:
                headers = {"Range": f"bytes={i}-"} if i % 2 else {}  # half whole files, half ranges
                async with session.get(server.url("llama.slm"), headers=headers) as response:
                    body = await response.read()
                prefix = (model_dir / "llama.slm").read_bytes()[:i] if i % 2 else b""
                return hashlib.sha256(prefix + body).hexdigest()

            digests = await asyncio.gather(*(fetch_one(i) for i in range(200)))
    assert digests == [expected] * 200


def test_a_directory_that_is_not_one_is_a_model_directory_error(tmp_path: Path) -> None:
    (tmp_path / "model.slm").write_bytes(b"")
    with pytest.raises(ModelDirectoryError, match="is not a directory") as caught:
        create_app(ServerConfig(directory=tmp_path / "model.slm"))
    assert isinstance(caught.value, NotADirectoryError)  # what callers caught before the error tree held it


def test_a_directory_given_as_a_string_is_a_path(tmp_path: Path) -> None:
    """``ServerConfig(directory="models")`` from an API user: a missing one is the tree's error, not an AttributeError."""
    assert ServerConfig(directory=str(tmp_path)).directory == tmp_path
    with pytest.raises(ModelDirectoryError, match="is not a directory"):
        create_app(ServerConfig(directory=str(tmp_path / "missing")))
