"""Mirrors: one model from several hosts at once, through real sockets; a host of another model, a dead one and a
corrupt one are each handled without losing verified work."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamload
from streamload.cli import main
from streamload.download.hosts import MIN_SPAN_S, RateMeter, span_limit_bytes
from streamload.download.probes import check_mirrors
from streamload.errors import UsageError
from streamload.formats import ModelReader
from tests.support.checks import assert_cache_exact, start_cli_server
from tests.support.faulty import Faults, faulty_app
from tests.support.ports import free_port
from tests.support.relay import CountingRelay
from tests.support.serving import ServerThread, serve_directory

FAST_RETRY = streamload.RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2, stall_timeout_s=1.0)


def other_model_at_same_path(tmp_path: Path, llama_slm: Path) -> Path:
    """A directory whose deep.slm is another model (what a stale or wrong mirror serves)."""
    directory = tmp_path / "other"
    directory.mkdir()
    (directory / "deep.slm").write_bytes(llama_slm.read_bytes())
    return directory


async def test_two_mirrors_share_the_download(www: Path, deep_slm: Path, tmp_path: Path) -> None:
    # each link alone would take 3 s: long enough that the second mirror's header probe, slow on a loaded machine,
    # still leaves it a real share (the speed: tools/bench_mirrors.py)
    rate = deep_slm.stat().st_size / 3.0
    with serve_directory(www) as first, serve_directory(www) as second:
        with CountingRelay(first.port, rate) as link_a, CountingRelay(second.port, rate) as link_b:
            url_a, url_b = f"http://127.0.0.1:{link_a.port}/deep.slm", f"http://127.0.0.1:{link_b.port}/deep.slm"
            async with streamload.open(url_a, mirrors=[url_b], cache_dir=tmp_path) as model:
                stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    size = deep_slm.stat().st_size
    for link, url in ((link_a, url_a), (link_b, url_b)):  # each host sent a real share, and the client counted it
        assert link.bytes_down > size / 5, (link_a.bytes_down, link_b.bytes_down)
        assert stats.bytes_by_source[url] > size / 5
    assert_cache_exact(tmp_path, deep_slm)


async def test_a_mirror_of_another_model_is_refused(
    www: Path, deep_slm: Path, llama_slm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve_directory(www) as good, serve_directory(other_model_at_same_path(tmp_path, llama_slm)) as other:
        wrong = other.url("deep.slm")
        with caplog.at_level(logging.WARNING, logger="streamload"):
            async with streamload.open(good.url("deep.slm"), mirrors=[wrong], cache_dir=tmp_path / "cache") as model:
                stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    assert wrong not in stats.bytes_by_source  # nothing of it was used
    with ModelReader(llama_slm) as reader:
        other_digest = reader.manifest.digest
    assert any(wrong in r.message and "another model" in r.message and other_digest[:12] in r.message for r in caplog.records)
    assert_cache_exact(tmp_path / "cache", deep_slm)


def test_the_cli_names_a_refused_mirror(www: Path, deep_slm: Path, llama_slm: Path, tmp_path: Path) -> None:
    with serve_directory(www) as good, serve_directory(other_model_at_same_path(tmp_path, llama_slm)) as other:
        command = [sys.executable, "-m", "streamload.cli", "fetch", good.url("deep.slm"), "--mirror", other.url("deep.slm")]
        result = subprocess.run([*command, "--cache-dir", str(tmp_path / "cache"), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"{other.url('deep.slm')}: it serves another model" in result.stderr and "refused" in result.stderr
    assert f"0 B from {other.url('deep.slm')}" in result.stdout
    assert_cache_exact(tmp_path / "cache", deep_slm)


@pytest.mark.parametrize("killed", ["primary", "mirror"])
async def test_a_mirror_killed_mid_download(www: Path, deep_slm: Path, tmp_path: Path, killed: str) -> None:
    rate = str(deep_slm.stat().st_size / 4.0)  # per connection: about a second for the whole model over four
    ports = free_port(), free_port()
    servers = [start_cli_server(www, port, "--rate", rate) for port in ports]
    victim = servers[0 if killed == "primary" else 1]
    urls = [f"http://127.0.0.1:{port}/deep.slm" for port in ports]
    try:
        async with streamload.open(urls[0], mirrors=[urls[1]], cache_dir=tmp_path, retry=FAST_RETRY) as model:
            deadline = time.monotonic() + 10
            while not all(url in model._session.stats.bytes_by_source for url in urls) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # both have sent chunks
            assert not model._session.complete.done()
            victim.send_signal(signal.SIGKILL)  # mid-download: the other one takes what it had not sent
            victim.wait()
            stats = await model.wait_complete()
    finally:
        for server in servers:
            server.kill()
            server.wait()
    assert stats.chunks_fetched == stats.chunks_total
    assert all(stats.bytes_by_source.get(url, 0) > 0 for url in urls)  # both served some before one died
    assert_cache_exact(tmp_path, deep_slm)


def first_chunk_offsets(path: Path, *positions: int) -> list[int]:
    with ModelReader(path) as reader:
        return [reader.preamble.data_offset + reader.manifest.chunks[p].offset for p in positions]


@pytest.mark.parametrize("mirror_corrupts", [False, True], ids=["one-corrupt-host", "both-corrupt-other-chunks"])
async def test_a_corrupt_chunk_is_fetched_from_another_mirror(www: Path, deep_slm: Path, tmp_path: Path, mirror_corrupts: bool) -> None:
    # the primary always corrupts chunk 0, which its first request (the header's, going on into the data) carries
    chunk0, chunk_last = first_chunk_offsets(deep_slm, 0, -1)
    faults_a = Faults(corrupt_range=(chunk0, chunk0 + 1), corrupt_times=10**6)
    faults_b = Faults(corrupt_range=(chunk_last, chunk_last + 1), corrupt_times=10**6 if mirror_corrupts else 0)
    with ServerThread(faulty_app(deep_slm, faults_a)) as a, ServerThread(faulty_app(deep_slm, faults_b)) as b:
        url_a, url_b = a.url("deep.slm"), b.url("deep.slm")
        async with streamload.open(url_a, mirrors=[url_b], cache_dir=tmp_path, retry=FAST_RETRY) as model:
            stats = await model.wait_complete()
    assert stats.integrity_failures >= 1
    assert 10**6 - faults_a.corrupt_times == 1  # the primary was never asked for chunk 0 again: the mirror sent it
    if mirror_corrupts:
        assert 10**6 - faults_b.corrupt_times <= 1  # nor the mirror for the chunk it corrupts, if it was asked at all
    assert stats.bytes_by_source[url_b] > 0
    assert_cache_exact(tmp_path, deep_slm)


async def test_a_chunk_every_mirror_corrupts_is_fatal_and_named(deep_slm: Path, tmp_path: Path) -> None:
    (chunk0,) = first_chunk_offsets(deep_slm, 0)
    faults = [Faults(corrupt_range=(chunk0, chunk0 + 1), corrupt_times=10**6) for _ in range(2)]
    with ServerThread(faulty_app(deep_slm, faults[0])) as a, ServerThread(faulty_app(deep_slm, faults[1])) as b:
        async with streamload.open(a.url("deep.slm"), mirrors=[b.url("deep.slm")], cache_dir=tmp_path, retry=FAST_RETRY) as model:
            with pytest.raises(
                streamload.ChunkIntegrityError, match=r"chunk \d+ of layer 0 failed its sha256 check in 3 downloads from"
            ) as info:
                await model.wait_complete()
    assert a.url("deep.slm") in str(info.value) and b.url("deep.slm") in str(info.value)


async def test_every_mirror_gone_is_one_clear_error(www: Path, deep_slm: Path, tmp_path: Path) -> None:
    ports = free_port(), free_port()
    servers = [start_cli_server(www, port, "--rate", str(deep_slm.stat().st_size / 2.0)) for port in ports]
    urls = [f"http://127.0.0.1:{port}/deep.slm" for port in ports]
    try:
        async with streamload.open(urls[0], mirrors=[urls[1]], cache_dir=tmp_path, retry=FAST_RETRY) as model:
            await model.layer(1)
            for server in servers:
                server.kill()
                server.wait()
            with pytest.raises(streamload.FetchError, match="every source of .* failed") as info:
                await model.wait_complete()
    finally:
        for server in servers:
            server.kill()
            server.wait()
    assert all(url in str(info.value) for url in urls)


def test_mirror_urls_are_checked() -> None:
    assert check_mirrors("http://a/m.slm", ["http://b/m.slm", "http://b/m.slm", "http://a/m.slm"]) == ["http://b/m.slm"]
    with pytest.raises(UsageError, match="local file"):
        check_mirrors("/tmp/m.slm", ["http://b/m.slm"])
    with pytest.raises(UsageError, match="http"):
        check_mirrors("http://a/m.slm", ["ftp://b/m.slm"])


def test_a_faster_worker_takes_larger_spans_and_spans_shrink_at_the_end() -> None:
    slow, fast, new = RateMeter(1e6), RateMeter(3e6), RateMeter()
    meters = [slow, fast, new]
    chunk = 1 << 20
    assert span_limit_bytes(new, meters, 100 << 20, chunk) == chunk  # unmeasured: one chunk first
    assert span_limit_bytes(fast, meters, 100 << 20, chunk) == 3 * span_limit_bytes(slow, meters, 100 << 20, chunk)
    assert span_limit_bytes(fast, meters, 8 << 20, chunk) < span_limit_bytes(fast, meters, 100 << 20, chunk)
    assert span_limit_bytes(slow, meters, 1 << 10, chunk) == int(1e6 * MIN_SPAN_S)  # a floor: a few round trips' worth


def test_run_streams_from_mirrors_as_from_one_host(www: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with serve_directory(www) as first, serve_directory(www) as second:
        alone = main(["run", first.url("deep.slm"), "--ids", "1,2,3", "--cache-dir", str(tmp_path / "alone"), "--json", "-q"])
        expected = json.loads(capsys.readouterr().out)
        shared = main(
            ["run", first.url("deep.slm"), "--mirror", second.url("deep.slm"), "--ids", "1,2,3"]
            + ["--cache-dir", str(tmp_path / "shared"), "--json", "-q"]
        )
        result = json.loads(capsys.readouterr().out)
    assert alone == shared == 0
    assert result["generated_ids"] == expected["generated_ids"] and result["text"] == expected["text"]


def test_the_cli_refuses_a_mirror_that_is_not_a_url(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fetch", "http://127.0.0.1:1/m.slm", "--mirror", "m.slm"])
    assert info.value.code == 2 and "--mirror" in capsys.readouterr().err
