"""Nothing wrong in the cache is ever used: damage is found before use and fetched again (or reported offline),
a lost journal or header is recovered, links are never written through, and disk space follows verified data."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.cache import JOURNAL_NAME
from streamload.formats import ModelReader, ModelWriter
from streamload.store_space import RESERVE_BLOCK_BYTES
from tests.checks import assert_cache_exact, assert_layers_equal_file, free_port
from tests.faulty import Faults, faulty_app
from tests.serving import ServerThread, serve_directory

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
    started = time.perf_counter()
    async with streamload.open(f"http://127.0.0.1:{port}/deep.slm", cache_dir=tmp_path) as model:  # default retry policy
        await model.layer(1)
    assert time.perf_counter() - started < 2.0  # no rounds of retries against a refused connection
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
    write_sparse_model(path, layers=8, layer_bytes=32 << 20)  # a 256 MiB store behind a small file
    with ModelReader(path) as reader:
        chunks = reader.manifest.chunks
        layer2_end = reader.manifest.layers[2].raw_end
        fail_from = reader.preamble.data_offset + next(c for c in chunks if c.layer_index == 3).offset
    store_blocks = lambda: os.stat(next((tmp_path / "cache" / "models").iterdir()) / "store.bin").st_blocks * 512  # noqa: E731
    faults = Faults(fail_from=fail_from)  # no answer gets past layer 3's first byte
    with ServerThread(faulty_app(path, faults)) as server:
        async with streamload.open(server.url("zeros.slm"), cache_dir=tmp_path / "cache", retry=QUICK) as model:
            await model.layer(2)
            assert store_blocks() <= layer2_end + 2 * RESERVE_BLOCK_BYTES  # never the 256 MiB the manifest declares
            with pytest.raises(streamload.FetchError):
                await model.wait_complete()
    assert store_blocks() <= layer2_end + (64 << 10)  # what was reserved but never verified was given back
