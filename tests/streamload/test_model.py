"""The public client API (streamload.open / load, Model) against real servers on loopback sockets."""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import pytest

import streamload
from streamload.cache import ModelCache
from streamload.formats import ModelReader
from tests.support.checks import RECEIVE_PATHS, assert_layers_equal_file, open_via
from tests.support.faulty import Faults, faulty_app
from tests.support.mutate import join_file, split_file
from tests.support.serving import ServerThread, serve_directory


@RECEIVE_PATHS
async def test_layers_arrive_in_order_and_exact(tmp_path: Path, www: Path, receive_path: str) -> None:
    seen: dict[int, streamload.Layer] = {}
    progress: list[streamload.Progress] = []
    rate = (www / "minilm.slm").stat().st_size / 0.6  # layers a transfer time apart, not a thread's whim
    async with contextlib.AsyncExitStack() as stack:
        server = stack.enter_context(serve_directory(www, rate_bytes_per_s=rate))
        model = await stack.enter_async_context(
            open_via(receive_path, server.url("minilm.slm"), cache_dir=tmp_path, progress=progress.append)
        )
        async for index, layer in model.layers():
            assert index == len(seen)
            seen[index] = layer
        stats = await model.wait_complete()
        ready = model.layer_ready_s
        assert model.tokenizer.encode("streaming models").tokens[:3] == ["[CLS]", "streaming", "models"]
        assert_layers_equal_file(seen, www / "minilm.slm")
        assert not seen[1]["encoder.layer.0.attention.self.query.weight"].flags.writeable
    # in file order, up to the time a pool thread takes to process one chunk (a tiny last layer can finish
    # on one thread while another still stores the chunk before it)
    assert all(later >= earlier - 0.05 for earlier, later in zip(ready, ready[1:], strict=False))
    assert stats.chunks_fetched == stats.chunks_total and stats.bytes_downloaded >= (www / "minilm.slm").stat().st_size - 64
    assert progress[-1].layers_ready == progress[-1].layers_total == 9  # embeddings, 6 blocks, head, the token table


@RECEIVE_PATHS
async def test_a_late_layer_jumps_the_queue(www: Path, tmp_path: Path, receive_path: str) -> None:
    size = (www / "deep.slm").stat().st_size
    with serve_directory(www, rate_bytes_per_s=size / 2.0) as server:  # ~2 s for the file
        async with open_via(receive_path, server.url("deep.slm"), cache_dir=tmp_path) as model:
            last_block = len(model.manifest.layers) - 2
            await model.layer(last_block)
            ready = model.layer_ready_s
            assert ready[last_block] is not None
            assert ready[2] is None  # block 1 is still on the wire: the late layer went first
            await model.wait_complete()
            ready = model.layer_ready_s
    assert ready[last_block] < ready[2]


@RECEIVE_PATHS
async def test_parallel_connections_fill_every_layer_exactly(www: Path, tmp_path: Path, receive_path: str) -> None:
    size = (www / "deep.slm").stat().st_size
    with serve_directory(www, rate_bytes_per_s=size / 1.0) as server:  # per connection: spans overlap in time
        async with open_via(receive_path, server.url("deep.slm"), cache_dir=tmp_path, connections=3, verify_threads=2) as model:
            layers = {i: layer async for i, layer in model.layers()}
            stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total and stats.integrity_failures == 0
    assert_layers_equal_file(layers, www / "deep.slm")


async def test_a_cached_model_needs_no_download_and_works_offline(www: Path, tmp_path: Path) -> None:
    with serve_directory(www) as server:
        url = server.url("deep.slm")
        async with streamload.open(url, cache_dir=tmp_path) as model:
            await model.wait_complete()
            digest = model.digest
        async with streamload.open(url, cache_dir=tmp_path) as model:
            stats = await model.wait_complete()
            assert stats.chunks_fetched == 0 and stats.chunks_cached == stats.chunks_total
    # server gone: the URL's last digest is in the cache
    async with streamload.open(url, cache_dir=tmp_path, retry=streamload.RetryPolicy(max_attempts=2, base_delay_s=0.01)) as model:
        assert model.digest == digest
        assert_layers_equal_file({i: await model.layer(i) for i in range(3)}, www / "deep.slm")
    async with streamload.open(f"{url}#sha256={digest}", cache_dir=tmp_path) as model:  # pinned: no network at all
        assert (await model.wait_complete()).bytes_downloaded == 0


async def test_server_that_ignores_range(www: Path, tmp_path: Path) -> None:
    with serve_directory(www, ranges_enabled=False) as server:
        async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path, connections=3) as model:
            layers = {i: layer async for i, layer in model.layers()}
            stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    assert_layers_equal_file(layers, www / "deep.slm")


@RECEIVE_PATHS
async def test_corrupted_chunk_is_refetched(deep_slm: Path, tmp_path: Path, receive_path: str) -> None:
    with ModelReader(deep_slm) as reader:
        chunk = reader.manifest.chunks[5]
        start = reader.preamble.data_offset + chunk.offset
    faults = Faults(corrupt_range=(start + 10, start + 11), corrupt_times=1)
    with ServerThread(faulty_app(deep_slm, faults)) as server:
        async with open_via(receive_path, server.url("deep.slm"), cache_dir=tmp_path) as model:
            layers = {i: layer async for i, layer in model.layers()}
            stats = await model.wait_complete()
    assert stats.integrity_failures == 1
    assert_layers_equal_file(layers, deep_slm)


@RECEIVE_PATHS
async def test_a_server_that_always_corrupts_gives_a_clear_error(deep_slm: Path, tmp_path: Path, receive_path: str) -> None:
    with ModelReader(deep_slm) as reader:
        chunk = reader.manifest.chunks[5]
        start = reader.preamble.data_offset + chunk.offset
    faults = Faults(corrupt_range=(start, start + 1), corrupt_times=10**6)
    with ServerThread(faulty_app(deep_slm, faults)) as server:
        async with open_via(receive_path, server.url("deep.slm"), cache_dir=tmp_path) as model:
            await model.layer(0)  # layers before the bad chunk are fine
            with pytest.raises(
                streamload.ChunkIntegrityError, match=f"chunk 5 of layer {chunk.layer_index} failed its sha256 check in 3 downloads"
            ) as info:
                await model.layer(chunk.layer_index)
            assert info.value.layer_index == chunk.layer_index and info.value.chunk_index == 5
            with pytest.raises(streamload.ChunkIntegrityError):
                await model.wait_complete()
        done = ModelCache(tmp_path, model.digest).read_journal(10**6)
    assert 5 not in done


@RECEIVE_PATHS
async def test_a_chunk_that_matches_its_hash_but_does_not_decode_stops_the_download(
    deep_slm: Path, tmp_path: Path, receive_path: str
) -> None:
    """A file converted wrong (hash of garbage in the manifest): a clear FormatError, nothing of it stored, no hang."""
    manifest, data = split_file(deep_slm.read_bytes())
    entry = manifest["chunks"][5]
    garbage = b"\x00" * 4 + data[entry["offset"] + 4 : entry["offset"] + entry["size"]]  # no zstd magic
    entry["sha256"] = hashlib.sha256(garbage).digest()
    served = tmp_path / "served"
    served.mkdir()
    (served / "bad.slm").write_bytes(join_file(manifest, data[: entry["offset"]] + garbage + data[entry["offset"] + entry["size"] :]))
    with serve_directory(served) as server:
        async with open_via(receive_path, server.url("bad.slm"), cache_dir=tmp_path / "cache") as model:
            with pytest.raises(streamload.FormatError, match=f"chunk 5 of layer {entry['layer']} is not a zstd frame"):
                await model.wait_complete()
        assert 5 not in ModelCache(tmp_path / "cache", model.digest).read_journal(10**6)


async def test_digest_pinning_refuses_another_model(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(streamload.DigestMismatchError, match="not the pinned"):
        async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path, digest="0" * 64):
            pass
    with pytest.raises(streamload.DigestMismatchError, match="not the pinned"):
        async with streamload.open(server.url("deep.slm") + "#sha256=" + "a" * 64, cache_dir=tmp_path):
            pass
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


async def test_missing_model_is_a_clear_error(server: ServerThread, tmp_path: Path) -> None:
    with pytest.raises(streamload.HTTPStatusError, match="no model at .*nope.slm \\(404\\)"):
        async with streamload.open(server.url("nope.slm"), cache_dir=tmp_path):
            pass


async def test_local_file_source(deep_slm: Path, tmp_path: Path) -> None:
    async with streamload.open(deep_slm, cache_dir=tmp_path) as model:
        layers = {i: layer async for i, layer in model.layers()}
        assert (await model.wait_complete()).bytes_downloaded == 0
    assert_layers_equal_file(layers, deep_slm)


def test_sync_wrapper(server: ServerThread, tmp_path: Path, www: Path) -> None:
    with streamload.load(server.url("deep.slm"), cache_dir=tmp_path) as model:
        layers = dict(model.layers())
        assert model.wait_complete().chunks_fetched == len(model.manifest.chunks)
        assert_layers_equal_file(layers, www / "deep.slm")


def test_inspect_a_url_reads_only_the_manifest(server: ServerThread, www: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamload.cli import main

    assert main(["inspect", server.url("minilm.slm"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    with ModelReader(www / "minilm.slm") as reader:
        assert summary["manifest_digest"] == reader.manifest.digest
        assert summary["file_bytes"] == reader.size_bytes
    assert summary["architecture"] == "bert" and len(summary["layers"]) == 9
    assert [layer["kind"] for layer in summary["layers"]] == ["step"] * 8 + ["rows"]


def test_list_and_rm_the_cache(server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamload.cli import main

    url = server.url("deep.slm")
    assert main(["fetch", url, "--cache-dir", str(tmp_path), "--json"]) == 0
    digest = json.loads(capsys.readouterr().out)["manifest_digest"]
    assert main(["list", "--cache-dir", str(tmp_path), "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["digest"], entry["status"], entry["sources"], entry["architecture"]) == (digest, "complete", [url], "llama")
    assert entry["size_bytes"] > 0
    assert main(["rm", "00", "--cache-dir", str(tmp_path)]) == 1  # too short to be a safe prefix
    assert "see `streamload list`" in capsys.readouterr().err
    assert main(["rm", digest[:8], "--cache-dir", str(tmp_path)]) == 0
    assert "deleted" in capsys.readouterr().out
    assert main(["list", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert not any((tmp_path / "refs").iterdir())  # its URL ref went with it


async def test_a_resumed_download_reports_progress_out_of_the_whole(www: Path, tmp_path: Path) -> None:
    """The bar of a resumed download goes on from what the cache held (issue: it restarted from 0 of the rest)."""
    from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD

    with serve_directory(www) as server:
        async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
            await model.wait_complete()
            manifest = model.manifest
        (model_dir,) = (tmp_path / "models").iterdir()
        (model_dir / "complete").unlink()
        journal = model_dir / JOURNAL_NAME
        kept = [r for r in JOURNAL_RECORD.iter_unpack(journal.read_bytes()) if manifest.chunks[r[0]].layer_index <= 2]
        journal.write_bytes(b"".join(JOURNAL_RECORD.pack(*r) for r in kept))
        seen: list[streamload.Progress] = []
        async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path, progress=seen.append) as model:
            await model.wait_complete()
    cached = sum(manifest.chunks[index].size_bytes for index, _ in kept)
    data = sum(c.size_bytes for c in manifest.chunks)
    assert seen and all(p.bytes_cached == cached and p.bytes_cached + p.bytes_to_download == data for p in seen)
    assert seen[-1].bytes_cached + seen[-1].bytes_downloaded >= data  # ends at the whole, not at the rest


async def test_a_complete_model_from_an_unchanged_url_costs_one_conditional_request(
    www: Path, minilm_slm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The second open sends If-None-Match with the ETag the first one saw: a 304, no manifest read again, nothing
    downloaded. When the file is replaced, the condition fails and the new model is fetched."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "model.slm").write_bytes((www / "deep.slm").read_bytes())
    with serve_directory(served) as server:
        url = server.url("model.slm")
        async with streamload.open(url, cache_dir=tmp_path / "cache") as model:
            first = await model.wait_complete()
        caplog.set_level("INFO", logger="streamload.download.origin")
        for _ in range(3):  # every time, not every other time: a 304 keeps the ETag it revalidated
            caplog.clear()
            async with streamload.open(url, cache_dir=tmp_path / "cache") as model:
                again = await model.wait_complete()
            assert first.bytes_downloaded > 0 and again.bytes_downloaded == 0 and again.chunks_fetched == 0
            assert "is unchanged (ETag" in caplog.text
        (served / "model.slm").write_bytes(minilm_slm.read_bytes())  # a new model at the same URL
        async with streamload.open(url, cache_dir=tmp_path / "cache") as model:
            replaced = await model.wait_complete()
            assert model.digest == ModelReader(minilm_slm).manifest.digest
    assert replaced.chunks_fetched == replaced.chunks_total
