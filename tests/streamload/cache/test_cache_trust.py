"""Nothing wrong in the cache is ever used: damage is found before use and fetched again (or reported offline),
a lost journal or header is recovered, links are never written through, and disk space follows verified data."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.cache import JOURNAL_NAME
from streamload.cache.store_space import RESERVE_BLOCK_BYTES
from streamload.formats import ModelReader, ModelWriter
from tests.support.checks import assert_cache_exact, assert_layers_equal_file
from tests.support.faulty import Faults, faulty_app
from tests.support.ports import free_port
from tests.support.serving import ServerThread, serve_directory

QUICK = streamload.RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, connect_timeout_s=2)


def model_dir_of(cache: Path) -> Path:
    return next((cache / "models").iterdir())


async def fill_cache(url: str, cache: Path) -> str:
    async with streamload.open(url, cache_dir=cache) as model:
        await model.wait_complete()
        return model.digest


def damage(store: Path, how: str, first_layer_end: int) -> None:
    if how == "truncated":
        os.truncate(store, first_layer_end)
    elif how == "zeroed":
        with open(store, "r+b") as f:
            f.write(bytes(first_layer_end))
    else:  # one byte flipped in the middle of the first layer
        with open(store, "r+b") as f:
            f.seek(first_layer_end // 2)
            byte = f.read(1)
            f.seek(first_layer_end // 2)
            f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("how", ["truncated", "zeroed", "flipped"])
async def test_a_damaged_cache_is_fetched_again_when_the_source_is_up(server: ServerThread, www: Path, tmp_path: Path, how: str) -> None:
    url = server.url("minilm.slm")
    digest = await fill_cache(url, tmp_path)
    with ModelReader(www / "minilm.slm") as reader:
        damage(model_dir_of(tmp_path) / "store.bin", how, reader.manifest.layers[0].raw_end)
    for source in (url, f"{url}#sha256={digest}"):  # unpinned, and pinned (which otherwise needs no network)
        async with streamload.open(source, cache_dir=tmp_path) as model:
            layers = {i: layer async for i, layer in model.layers()}
            assert model.stats.chunks_fetched > 0 if source == url else True
        assert_layers_equal_file(layers, www / "minilm.slm")
    assert_cache_exact(tmp_path, www / "minilm.slm")


@pytest.mark.parametrize(("how", "layer"), [("truncated", "layer 1 (block.0)"), ("flipped", "layer 0 (embeddings)")])
def test_a_damaged_cache_offline_is_a_clear_error_naming_the_layer(
    server: ServerThread, www: Path, tmp_path: Path, how: str, layer: str
) -> None:
    import asyncio

    url = server.url("minilm.slm")
    digest = asyncio.run(fill_cache(url, tmp_path))
    with ModelReader(www / "minilm.slm") as reader:
        damage(model_dir_of(tmp_path) / "store.bin", how, reader.manifest.layers[0].raw_end)
    offline = f"http://127.0.0.1:{free_port()}/minilm.slm#sha256={digest}"  # pinned, and nobody listens there
    result = subprocess.run(
        [sys.executable, "-m", "streamload.cli", "run", offline, "--cache-dir", str(tmp_path), "--text", "hello", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert f"{layer} of the cached model {digest[:12]} is damaged" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


async def test_a_lost_journal_is_recovered_pinned_with_the_server_up(server: ServerThread, www: Path, tmp_path: Path) -> None:
    url = server.url("deep.slm")
    digest = await fill_cache(url, tmp_path)
    (model_dir_of(tmp_path) / JOURNAL_NAME).unlink()
    async with streamload.open(f"{url}#sha256={digest}", cache_dir=tmp_path) as model:
        stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    assert_cache_exact(tmp_path, www / "deep.slm")


async def test_a_lost_journal_offline_is_a_clear_error(server: ServerThread, www: Path, tmp_path: Path) -> None:
    url = server.url("deep.slm")
    digest = await fill_cache(url, tmp_path)
    (model_dir_of(tmp_path) / JOURNAL_NAME).unlink()
    offline = f"http://127.0.0.1:{free_port()}/deep.slm"
    with pytest.raises(streamload.FetchError, match=f"the cached copy of {digest[:12]} lacks .* cannot be reached"):
        async with streamload.open(f"{offline}#sha256={digest}", cache_dir=tmp_path, retry=QUICK):
            pass


async def test_a_garbled_cached_header_is_fetched_again(server: ServerThread, www: Path, tmp_path: Path) -> None:
    url = server.url("deep.slm")
    digest = await fill_cache(url, tmp_path)
    (model_dir_of(tmp_path) / "header.slm").write_bytes(b"garbage" * 10)
    async with streamload.open(f"{url}#sha256={digest}", cache_dir=tmp_path) as model:
        await model.wait_complete()
        assert model.digest == digest
    assert_cache_exact(tmp_path, www / "deep.slm")


async def test_a_symlinked_store_is_never_written_through(server: ServerThread, tmp_path: Path) -> None:
    url = server.url("deep.slm")
    async with streamload.open(url, cache_dir=tmp_path / "probe") as model:  # learn the digest
        digest = model.digest
    directory = tmp_path / "cache" / "models" / digest
    directory.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (directory / "store.bin").symlink_to(victim)
    with pytest.raises(streamload.CacheError, match="symbolic link"):
        async with streamload.open(url, cache_dir=tmp_path / "cache") as model:
            await model.wait_complete()
    assert victim.read_bytes() == b"precious"


async def test_a_complete_copy_is_used_at_once_when_the_server_is_down(www: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with serve_directory(www) as running:
        port = running.port
        await fill_cache(running.url("deep.slm"), tmp_path)
    caplog.set_level(logging.WARNING, logger="streamload")
    async with streamload.open(f"http://127.0.0.1:{port}/deep.slm", cache_dir=tmp_path) as model:  # default retry policy
        await model.layer(1)
    assert not [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]  # no rounds against a refused connection
    lines = [r.getMessage() for r in caplog.records if "using the cached copy" in r.getMessage()]
    assert len(lines) == 1 and f"cannot connect to 127.0.0.1:{port} (Connection refused)" in lines[0]
    assert "ssl:default" not in lines[0]


def write_sparse_model(path: Path, layers: int, layer_bytes: int) -> None:
    """Layers of zeros: a few KB on the wire, ``layers x layer_bytes`` in the store."""
    with ModelWriter(
        path, config={"architecture": "zeros"}, tokenizer_json=None, chunk_size_bytes=1 << 20, zstd_level=3, threads=1
    ) as writer:
        for index in range(layers):
            writer.begin_layer(f"layer{index}")
            writer.add_tensor(f"zeros{index}", np.zeros(layer_bytes // 4, dtype=np.float32))
            writer.end_layer()
        writer.finish()


async def test_space_is_reserved_as_verified_data_arrives_and_given_back_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "zeros.slm"
    write_sparse_model(path, layers=8, layer_bytes=8 << 20)  # a 64 MiB store (the most a small file may declare)
    with ModelReader(path) as reader:
        chunks = reader.manifest.chunks
        layer2_end = reader.manifest.layers[2].raw_end
        fail_from = reader.preamble.data_offset + next(c for c in chunks if c.layer_index == 3).offset
    store_blocks = lambda: os.stat(next((tmp_path / "cache" / "models").iterdir()) / "store.bin").st_blocks * 512  # noqa: E731
    faults = Faults(fail_from=fail_from)  # no answer gets past layer 3's first byte
    with ServerThread(faulty_app(path, faults)) as server:
        async with streamload.open(server.url("zeros.slm"), cache_dir=tmp_path / "cache", retry=QUICK) as model:
            await model.layer(2)
            assert store_blocks() <= layer2_end + 2 * RESERVE_BLOCK_BYTES  # never the 64 MiB the manifest declares
            with pytest.raises(streamload.FetchError):
                await model.wait_complete()
    assert store_blocks() <= layer2_end + (64 << 10)  # what was reserved but never verified was given back


def flip_byte(store: Path, offset: int) -> None:
    with open(store, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


async def cache_with_two_damaged_layers(url: str, served: Path, cache: Path) -> tuple:
    """A complete cache of ``url`` with one byte flipped in layers 2 and 4; the file's layers."""
    await fill_cache(url, cache)
    with ModelReader(served) as reader:
        layers = reader.manifest.layers
    for index in (2, 4):
        flip_byte(model_dir_of(cache) / "store.bin", (layers[index].raw_offset + layers[index].raw_end) // 2)
    return layers


async def test_damage_found_in_two_layers_one_after_the_other_is_fetched_again_each_time(
    server: ServerThread, www: Path, tmp_path: Path
) -> None:
    """The second damaged layer is found while the download that refetched the first may still be making its last
    commits: that download fetches it too (it used to end without it, and the layer was waited for forever)."""
    url = server.url("deep.slm")
    layers = await cache_with_two_damaged_layers(url, www / "deep.slm", tmp_path)
    async with streamload.open(url, cache_dir=tmp_path) as model:
        async with asyncio.timeout(60):
            seen = [index async for index, _ in model.layers()]
            stats = await model.wait_complete()
    assert seen == list(range(len(layers))) and stats.chunks_fetched >= 2
    assert_cache_exact(tmp_path, www / "deep.slm")


async def test_a_mirror_still_being_probed_when_a_refetch_ends_is_probed_again_by_the_next(
    server: ServerThread, www: Path, tmp_path: Path
) -> None:
    """A mirror whose header never comes is still being probed when the download that refetched one damaged layer
    ends; the next damaged layer starts the download again, which probes that mirror again (no KeyError)."""
    url = server.url("deep.slm")
    await cache_with_two_damaged_layers(url, www / "deep.slm", tmp_path)
    silent = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        mirror = f"http://127.0.0.1:{silent.getsockname()[1]}/deep.slm"
        policy = streamload.RetryPolicy(header_timeout_s=30, connect_timeout_s=30)
        async with streamload.open(url, cache_dir=tmp_path, mirrors=[mirror], retry=policy) as model:
            async with asyncio.timeout(60):
                await model.layer(2)
                while not model.is_complete:  # the first refetch's download ends, the mirror still unanswered
                    await asyncio.sleep(0.02)
                await model.layer(4)
                await model.wait_complete()
    finally:
        silent.close()
    assert_cache_exact(tmp_path, www / "deep.slm")


async def test_space_is_never_given_back_through_a_closed_store(tmp_path: Path) -> None:
    """After close(), release_unverified does nothing: the store's descriptor number may belong to another file."""
    from streamload.cache import ModelCache

    cache = ModelCache(tmp_path, "ab" * 32)
    await cache.acquire()
    cache.open_store(16 << 20)
    cache.write_chunks(0, [b"x" * 4096])  # reserves the first block
    cache.close()
    other = tmp_path / "other.bin"
    other.write_bytes(b"V" * (1 << 20))
    descriptors = [os.open(other, os.O_RDWR) for _ in range(4)]  # the store's freed descriptor number among them
    try:
        assert cache.release_unverified([]) == 0
    finally:
        for fd in descriptors:
            os.close(fd)
    assert other.read_bytes() == b"V" * (1 << 20)
