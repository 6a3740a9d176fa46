"""Updates that move only what changed (docs/updates.md): chunks shared with a cached model are copied locally, the
rest fetched; every copied chunk checked. Tiny Llama versions made by perturbing tests/fixtures/llama-tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from streamload.cache import ModelCache
from streamload.formats import ModelReader, convert
from tests.checks import assert_cache_exact
from tests.serving import serve_directory
from tests.support.finetune import TINY_LLAMA, write_version

CHUNK_BYTES = 16 << 10  # several chunks per layer


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Served files: v1, and from it one block changed (block), the config changed (config)."""
    work = tmp_path_factory.mktemp("versions")
    www = work / "www"
    www.mkdir()
    sources = {
        "v1": TINY_LLAMA,
        "block": write_version(TINY_LLAMA, work / "block", move=0.5, only="layers.1."),
        "config": write_version(TINY_LLAMA, work / "config", config={"rms_norm_eps": 1e-5}),
    }
    for name, folder in sources.items():
        convert(folder, www / f"{name}.slm", chunk_size_bytes=CHUNK_BYTES)
    return {name: www / f"{name}.slm" for name in sources}


def fetch_json(url: str, cache: Path) -> dict:
    argv = [sys.executable, "-m", "streamload.cli", "fetch", url, "--cache-dir", str(cache), "--json"]
    return json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120).stdout)


def changed_bytes(new: Path, old: Path) -> tuple[int, int]:
    """(chunks of ``new`` whose sha256 ``old`` does not list, their compressed bytes)."""
    with ModelReader(old) as a, ModelReader(new) as b:
        held = {c.sha256 for c in a.manifest.chunks}
        changed = [c for c in b.manifest.chunks if c.sha256 not in held]
        return len(changed), sum(c.size_bytes for c in changed)


def header_bytes(path: Path) -> int:
    with ModelReader(path) as reader:
        return 32 + reader.preamble.manifest_size_bytes  # the preamble and manifest (the padding after them is not read)


def test_a_changed_block_moves_only_its_chunks_and_the_header(versions: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve_directory(versions["v1"].parent) as server:
        first = fetch_json(server.url("v1.slm"), cache)
        assert first["chunks_local"] == 0 and first["bytes_whole"] == first["bytes_downloaded"]
        report = fetch_json(server.url("block.slm"), cache)
    chunks, size = changed_bytes(versions["block"], versions["v1"])
    assert 0 < chunks < report["chunks_total"]
    assert report["chunks_local"] == report["chunks_total"] - chunks and report["chunks_whole"] == chunks
    assert report["bytes_delta"] == 0 and report["bytes_local"] > 0
    assert header_bytes(versions["block"]) + size <= report["bytes_downloaded"] <= 1.1 * (header_bytes(versions["block"]) + size)
    assert_cache_exact(cache, versions["block"])
    assert_cache_exact(cache, versions["v1"])  # the old version stays usable


def test_a_config_change_moves_the_header_alone(versions: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with serve_directory(versions["v1"].parent) as server:
        fetch_json(server.url("v1.slm"), cache)
        report = fetch_json(server.url("config.slm"), cache)
    assert report["chunks_local"] == report["chunks_total"] and report["chunks_whole"] == 0
    assert report["bytes_downloaded"] == header_bytes(versions["config"])
    assert_cache_exact(cache, versions["config"])


def test_a_damaged_cached_chunk_is_not_copied_but_fetched(versions: dict[str, Path], tmp_path: Path) -> None:
    """A byte flipped in the old version's store: that chunk fails its journaled xxh3, so the update downloads it."""
    cache = tmp_path / "cache"
    with serve_directory(versions["v1"].parent) as server:
        fetch_json(server.url("v1.slm"), cache)
        with ModelReader(versions["v1"]) as reader:
            victim = reader.manifest.chunks[1]
            digest = reader.manifest.digest
        store = ModelCache(cache, digest).store_path
        with open(store, "r+b") as f:
            f.seek(victim.raw_offset + 5)
            byte = f.read(1)
            f.seek(victim.raw_offset + 5)
            f.write(bytes([byte[0] ^ 0xFF]))
        report = fetch_json(server.url("config.slm"), cache)
    assert report["chunks_local"] == report["chunks_total"] - 1 and report["chunks_whole"] == 1
    assert_cache_exact(cache, versions["config"])


def test_a_client_with_nothing_cached_fetches_as_before(versions: dict[str, Path], tmp_path: Path) -> None:
    with serve_directory(versions["v1"].parent) as server:
        report = fetch_json(server.url("block.slm"), tmp_path / "cache")
    with ModelReader(versions["block"]) as reader:
        padding = reader.preamble.data_offset - header_bytes(versions["block"])
    assert report["chunks_local"] == 0 and report["bytes_downloaded"] == versions["block"].stat().st_size - padding
