"""Updates that move only what changed (docs/updates.md): chunks shared with a cached model are copied locally, the
rest fetched; every copied chunk checked. Tiny Llama versions made by perturbing tests/fixtures/llama-tiny."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import streamload
from streamload.cache import ModelCache
from streamload.calibrate import CalibratedShifts
from streamload.formats import ModelReader, convert
from tests.support.checks import assert_cache_exact
from tests.support.finetune import CHUNK_BYTES, TINY_LLAMA, fetch_json, header_bytes, write_version
from tests.support.serving import serve_directory


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


def changed_bytes(new: Path, old: Path) -> tuple[int, int]:
    """(chunks of ``new`` whose sha256 ``old`` does not list, their compressed bytes)."""
    with ModelReader(old) as a, ModelReader(new) as b:
        held = {c.sha256 for c in a.manifest.chunks}
        changed = [c for c in b.manifest.chunks if c.sha256 not in held]
        return len(changed), sum(c.size_bytes for c in changed)


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


async def test_a_first_download_spends_nothing_on_finding_shared_chunks_or_a_delta(
    versions: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no other model in the cache there is nothing to copy and no version a delta file could be against: the
    chunk digests are not indexed and the manifest's delta list is not parsed (on a 90k-chunk file, 30 ms a fetch)."""
    from streamload.download import updates

    def refuse(*args: object) -> None:
        raise AssertionError("looked for shared chunks or a delta base in a cache holding no other model")

    monkeypatch.setattr(updates, "copy_shared_chunks", refuse)
    monkeypatch.setattr(updates, "find_delta_base", refuse)
    with serve_directory(versions["v1"].parent) as server:
        async with streamload.open(server.url("block.slm"), cache_dir=tmp_path / "cache") as model:
            stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total > 0


# ---------------------------------------------------------------- deltas


@pytest.fixture(scope="module")
def delta_www(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Served: v1, a synthetic fine-tune of it (every weight moved by 2% of its tensor's spread) converted with
    --base v1 (so its delta file lies beside it), and the same fine-tune converted without a base."""
    work = tmp_path_factory.mktemp("delta")
    www = work / "www"
    www.mkdir()
    finetune = write_version(TINY_LLAMA, work / "ft", move=0.02)
    convert(TINY_LLAMA, www / "v1.slm", chunk_size_bytes=CHUNK_BYTES)
    report = convert(finetune, www / "ft.slm", chunk_size_bytes=CHUNK_BYTES, base=www / "v1.slm")
    assert report.delta is not None and report.delta.path is not None and report.delta.chunks_difference > 0
    other = tmp_path_factory.mktemp("other")
    convert(write_version(TINY_LLAMA, work / "other", move=1.0, seed=7), other / "other.slm", chunk_size_bytes=CHUNK_BYTES)
    return {"v1": www / "v1.slm", "ft": www / "ft.slm", "delta": report.delta.path, "other": other / "other.slm"}


def served_copy(files: list[Path], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for path in files:
        (directory / path.name).write_bytes(path.read_bytes())
    return directory


@pytest.mark.parametrize("ranges", [True, False])
def test_a_fine_tune_moves_its_delta_and_is_exact(delta_www: dict[str, Path], tmp_path: Path, ranges: bool) -> None:
    cache = tmp_path / "cache"
    delta_size = delta_www["delta"].stat().st_size
    with serve_directory(delta_www["v1"].parent, ranges_enabled=ranges) as server:
        fetch_json(server.url("v1.slm"), cache)
        report = fetch_json(server.url("ft.slm"), cache)
    assert report["chunks_delta"] == report["chunks_total"] and report["chunks_whole"] == 0
    assert report["bytes_delta"] == delta_size  # the index and every frame, on one request either way
    assert report["bytes_whole"] == header_bytes(delta_www["ft"])
    assert report["bytes_downloaded"] < 0.5 * delta_www["ft"].stat().st_size
    assert_cache_exact(cache, delta_www["ft"])
    assert_cache_exact(cache, delta_www["v1"])


def test_a_missing_delta_file_falls_back_to_whole_chunks(delta_www: dict[str, Path], tmp_path: Path) -> None:
    www = served_copy([delta_www["v1"], delta_www["ft"]], tmp_path / "www")  # no .slmd: a 404
    cache = tmp_path / "cache"
    with serve_directory(www) as server:
        fetch_json(server.url("v1.slm"), cache)
        report = fetch_json(server.url("ft.slm"), cache)
    assert report["chunks_delta"] == 0 and report["chunks_whole"] == report["chunks_total"]
    assert_cache_exact(cache, delta_www["ft"])


def fetch_with_a_damaged_delta(delta_www: dict[str, Path], tmp_path: Path, position: int, flip: int) -> dict:
    """``fetch --json`` of v1, then of the fine-tune, from a copy whose delta file has byte ``position`` XORed with
    ``flip``: the fine-tune's report (the cache is ``tmp_path / "cache"``)."""
    www = served_copy([delta_www["v1"], delta_www["ft"], delta_www["delta"]], tmp_path / "www")
    damaged = bytearray((www / delta_www["delta"].name).read_bytes())
    damaged[position] ^= flip
    (www / delta_www["delta"].name).write_bytes(bytes(damaged))
    with serve_directory(www) as server:
        fetch_json(server.url("v1.slm"), tmp_path / "cache")
        return fetch_json(server.url("ft.slm"), tmp_path / "cache")


def test_a_damaged_delta_frame_falls_back_for_its_chunk(delta_www: dict[str, Path], tmp_path: Path) -> None:
    # inside the last frame: its chunk rebuilds wrong (or does not decode), so it is fetched whole
    report = fetch_with_a_damaged_delta(delta_www, tmp_path, -3, 0x55)
    assert report["chunks_whole"] == 1 and report["chunks_delta"] == report["chunks_total"] - 1
    assert_cache_exact(tmp_path / "cache", delta_www["ft"])


def test_a_damaged_delta_index_is_refused_whole(delta_www: dict[str, Path], tmp_path: Path) -> None:
    # in the first entry: the index's sha256 no longer matches the manifest's
    report = fetch_with_a_damaged_delta(delta_www, tmp_path, 100, 0x01)
    assert report["chunks_delta"] == 0 and report["chunks_whole"] == report["chunks_total"]
    assert_cache_exact(tmp_path / "cache", delta_www["ft"])


def test_a_client_holding_another_version_fetches_as_before(delta_www: dict[str, Path], tmp_path: Path) -> None:
    """The delta is against v1; the cache holds another model: no delta request, the file comes whole."""
    www = served_copy([delta_www["ft"], delta_www["delta"], delta_www["other"]], tmp_path / "www")
    cache = tmp_path / "cache"
    with serve_directory(www) as server:
        fetch_json(server.url("other.slm"), cache)
        report = fetch_json(server.url("ft.slm"), cache)
    with ModelReader(delta_www["ft"]) as reader:
        padding = reader.preamble.data_offset - header_bytes(delta_www["ft"])
    assert report["chunks_delta"] == 0 and report["bytes_delta"] == 0
    assert report["bytes_downloaded"] == delta_www["ft"].stat().st_size - padding
    assert_cache_exact(cache, delta_www["ft"])


def test_a_fetch_killed_during_its_delta_resumes(delta_www: dict[str, Path], tmp_path: Path) -> None:
    """``streamload fetch`` of the fine-tune through a link slow enough that its delta takes ~4 s, killed (SIGKILL)
    once it has journaled rebuilt chunks; the next fetch rebuilds only the rest, and the cache is exact."""
    from tests.support.checks import kill_fetch_once_journaled, start_link

    cache = tmp_path / "cache"
    with ModelReader(delta_www["ft"]) as reader:
        digest, total = reader.manifest.digest, len(reader.manifest.chunks)
    with serve_directory(delta_www["v1"].parent) as server:
        fetch_json(server.url("v1.slm"), cache)
        link, port = start_link(server.port, rate_mbit=delta_www["delta"].stat().st_size * 8 / 1e6 / 4.0, rtt_ms=20)
        try:
            done = kill_fetch_once_journaled(f"http://127.0.0.1:{port}/ft.slm", cache, digest, total)
        finally:
            link.terminate()
            link.wait()
        assert 0 < len(done) < total, f"the kill must land while the delta is read ({len(done)} of {total} journaled)"
        report = fetch_json(server.url("ft.slm"), cache)
    assert report["chunks_cached"] == len(done) and report["chunks_delta"] == total - len(done) and report["chunks_whole"] == 0
    assert report["bytes_delta"] <= delta_www["delta"].stat().st_size  # frames already used are read over only within a 64 KiB gap
    assert_cache_exact(cache, delta_www["ft"])


async def test_layers_become_ready_in_order_while_the_delta_streams(delta_www: dict[str, Path], tmp_path: Path) -> None:
    """Through a link slow enough that the delta takes ~3 s: the steps become ready one after another as their chunks
    are rebuilt, the first long before the last; demanded rows of the token table come right (on an extra request to
    the delta file; through this link's one queue they cannot overtake what it holds already)."""
    import time

    import numpy as np

    import streamload
    from tests.support.checks import start_link

    cache = tmp_path / "cache"
    with ModelReader(delta_www["ft"]) as reader:
        manifest = reader.manifest
        table_name = next(t.name for t in manifest.tensors if manifest.layers[t.layer_index].kind.value == "rows")
        expected_rows = reader.read_tensors(manifest.tensor(table_name).layer_index)[table_name][[5, 300]]
    with serve_directory(delta_www["v1"].parent) as server:
        fetch_json(server.url("v1.slm"), cache)
        link, port = start_link(server.port, rate_mbit=delta_www["delta"].stat().st_size * 8 / 1e6 / 3.0, rtt_ms=20)
        try:
            started = time.perf_counter()
            reports: list[streamload.Progress] = []
            async with streamload.open(f"http://127.0.0.1:{port}/ft.slm", cache_dir=cache, progress=reports.append) as model:
                rows, _ = await model.rows(table_name, np.array([5, 300]))
                rows_s = time.perf_counter() - started
                stats = await model.wait_complete()
                ready = model.layer_ready_s
                total_s = time.perf_counter() - started
        finally:
            link.terminate()
            link.wait()
    np.testing.assert_array_equal(rows, expected_rows)
    assert stats.chunks_delta == stats.chunks_total and stats.chunks_fetched == 0
    steps = ready[: manifest.step_count]
    assert all(s is not None for s in steps) and steps == sorted(steps), ready
    assert steps[0] < 0.6 * steps[-1], ready  # the first step did not wait for the whole delta
    # a progress bar ends at the whole file: rebuilt chunks count as cached less their frames' bytes; beyond the file
    # only the delta bytes that rebuilt nothing (its index, frames read twice by the rows' request)
    done = reports[-1].bytes_cached + reports[-1].bytes_downloaded
    frames = delta_www["delta"].stat().st_size - (56 + 64 * stats.chunks_delta)
    assert 0 <= done - reports[-1].bytes_total <= stats.bytes_delta - frames + 64, (done, reports[-1].bytes_total)
    assert rows_s <= total_s
    assert_cache_exact(cache, delta_www["ft"])


def test_a_progressive_update_leaves_its_progressive_chunks_to_the_model_file(tiny_progressive_slm: Path, tmp_path: Path) -> None:
    """Progressive tensors' chunks (coarse levels and refinements) get no delta entry: they come whole; the rest from
    the delta; the result is exact."""
    www = tmp_path / "www"
    www.mkdir()
    shutil.copyfile(tiny_progressive_slm, www / "v1.slm")  # TINY_LLAMA, --progressive, in chunks of CHUNK_BYTES
    finetune = write_version(TINY_LLAMA, tmp_path / "ft", move=0.02)
    report = convert(
        finetune, www / "ft.slm", chunk_size_bytes=CHUNK_BYTES, progressive=True, calibrator=CalibratedShifts, base=www / "v1.slm"
    )
    assert report.delta is not None and report.delta.path is not None
    cache = tmp_path / "cache"
    with serve_directory(www) as server:
        fetch_json(server.url("v1.slm"), cache)
        result = fetch_json(server.url("ft.slm"), cache)
    assert result["chunks_delta"] > 0 and result["chunks_whole"] > 0
    assert result["chunks_delta"] + result["chunks_whole"] + result["chunks_local"] == result["chunks_total"]
    assert_cache_exact(cache, www / "ft.slm")


def test_the_cli_converts_against_a_base_and_inspects_the_delta(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streamload.cli", *args], capture_output=True, text=True, timeout=120)

    finetune = write_version(TINY_LLAMA, tmp_path / "ft", move=0.02)
    assert cli("convert", str(TINY_LLAMA), "-o", str(tmp_path / "v1.slm"), "--chunk-size", str(CHUNK_BYTES)).returncode == 0
    done = cli(
        "convert", str(finetune), "-o", str(tmp_path / "ft.slm"), "--chunk-size", str(CHUNK_BYTES), "--base", str(tmp_path / "v1.slm")
    )
    assert done.returncode == 0, done.stderr
    assert "kept the base's scales" in done.stdout and "quantized independently" in done.stdout and ".slmd" in done.stdout
    delta = next(tmp_path.glob("ft.*.slmd"))
    shown = cli("inspect", str(delta))
    assert shown.returncode == 0 and "delta file" in shown.stdout and "differences" in shown.stdout
    listed = cli("inspect", str(tmp_path / "ft.slm"))
    assert delta.name in listed.stdout
    report = json.loads(
        cli(
            "convert",
            str(finetune),
            "-o",
            str(tmp_path / "ft2.slm"),
            "--chunk-size",
            str(CHUNK_BYTES),
            "--base",
            str(tmp_path / "v1.slm"),
            "--json",
        ).stdout
    )
    assert report["rebase"]["rows_rebased"] > 0 and report["rebase"]["max_abs_error_ratio"] <= 1.25
    assert report["delta"]["bytes"] == next(tmp_path.glob("ft2.*.slmd")).stat().st_size
    same = cli("convert", str(finetune), "-o", str(tmp_path / "v1.slm"), "--base", str(tmp_path / "v1.slm"))
    assert same.returncode == 1 and "is the base too" in same.stderr and "Traceback" not in same.stderr
    with serve_directory(tmp_path) as server:
        fetch_json(server.url("v1.slm"), tmp_path / "cache")
        text = cli("fetch", server.url("ft.slm"), "--cache-dir", str(tmp_path / "cache"))
    assert text.returncode == 0 and "update:" in text.stdout and "chunks rebuilt" in text.stdout
