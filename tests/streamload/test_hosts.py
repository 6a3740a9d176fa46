"""Any static host, and a CDN edge: each started for real, checked from its own access log.

nginx, Caddy, Apache httpd and lighttpd honour Range (206); ``python -m http.server`` ignores it (200, the whole
file: the client reads it in order). Varnish in front of nginx stands for a CDN edge, cold and then warm.
Marked ``hosts``: CI runs them (``.ci/run`` installs the packages); ``-m 'not hosts'`` leaves them out locally.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.formats import ModelReader
from streamload.runtime import run
from tests.support.checks import assert_cache_exact, kill_fetch_once_journaled, start_host_or_skip, start_link
from tests.support.hosts import HOSTS, RANGES, Host, HostMissing, public_directory, start_edge
from tests.support.relay import CountingRelay

pytestmark = pytest.mark.hosts

SENTENCE = "a static host is all it takes"


@pytest.fixture(scope="session")
def public_www(minilm_slm: Path, deep_slm: Path) -> Iterator[Path]:
    """minilm.slm and deep.slm in a directory every host's worker may read (Apache's runs as nobody)."""
    directory = public_directory([minilm_slm, deep_slm])
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def local_embedding(minilm_slm: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    async def embed() -> np.ndarray:
        async with streamload.open(minilm_slm, cache_dir=tmp_path_factory.mktemp("local")) as model:
            return (await run(model, texts=[SENTENCE])).embedding

    return asyncio.run(embed())


@pytest.fixture(params=HOSTS)
def host(request: pytest.FixtureRequest, tmp_path: Path, public_www: Path) -> Iterator[Host]:
    running = start_host_or_skip(request.param, tmp_path / request.param, public_www)
    try:
        yield running
    finally:
        running.stop()


async def test_streamed_run_of_minilm_through_the_host_is_byte_exact(
    host: Host, tmp_path: Path, minilm_slm: Path, local_embedding: np.ndarray
) -> None:
    async with streamload.open(host.url("minilm.slm"), cache_dir=tmp_path / "cache") as model:
        result = await run(model, texts=[SENTENCE])
        await model.wait_complete()
        whole_file = model._session.source.whole_file_only  # type: ignore[union-attr]
    np.testing.assert_array_equal(result.embedding, local_embedding)
    assert_cache_exact(tmp_path / "cache", minilm_slm)
    host.stop()  # lighttpd writes its access log on the way out
    statuses = host.statuses()
    assert statuses and set(statuses) == ({"206"} if RANGES[host.kind] else {"200"}), statuses  # from the host's own log
    assert whole_file is not RANGES[host.kind]


def test_a_fetch_killed_midway_resumes_from_the_host(host: Host, tmp_path: Path, deep_slm: Path) -> None:
    """Kill ``streamload fetch`` (through a link slow enough to land mid-download) after its first commit; the next
    fetch moves only what the journal lacks (a host that ignores Range sends it all again: the cached part is dropped)."""
    size = deep_slm.stat().st_size
    with ModelReader(deep_slm) as reader:
        digest, chunks = reader.manifest.digest, reader.manifest.chunks
    cache = tmp_path / "cache"
    link, link_port = start_link(host.port, rate_mbit=size * 8 / 1e6 / 3.0, rtt_ms=20)  # the whole file in ~3 s
    try:
        done = kill_fetch_once_journaled(f"http://127.0.0.1:{link_port}/deep.slm", cache, digest, len(chunks))
    finally:
        link.terminate()
        link.wait()
    assert 0 < len(done) < len(chunks), f"the kill must land mid-download (journal {sorted(done)})"
    argv = [sys.executable, "-m", "streamload.cli", "fetch", host.url("deep.slm"), "--cache-dir", str(cache), "--json"]
    report = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert report["chunks_cached"] == len(done) and report["chunks_fetched"] == len(chunks) - len(done)
    missing = sum(c.size_bytes for c in chunks if c.index not in done)
    assert report["bytes_downloaded"] < (size if RANGES[host.kind] else 2 * size) and report["bytes_downloaded"] >= missing
    assert_cache_exact(cache, deep_slm)


async def test_a_varnish_edge_streams_a_cold_object_and_serves_it_warm(tmp_path: Path, public_www: Path, minilm_slm: Path) -> None:
    """Cold: Varnish fetches the whole object from nginx without Range (the origin logs one 200), and answers the
    client's ranges (206) while it is still arriving: layer 0 (55% of MiniLM) is ready before the file has passed
    the edge. Warm: served from the edge's cache, nothing from the origin."""
    size = minilm_slm.stat().st_size
    origin = start_host_or_skip("nginx", tmp_path / "nginx", public_www)
    try:
        with CountingRelay(origin.port, rate_bytes_per_s=size / 2.0) as origin_link:  # the origin's link: the file in 2 s
            try:
                edge = start_edge(tmp_path / "varnish", origin_link.port)
            except HostMissing as exc:
                pytest.skip(str(exc))
            try:
                async with streamload.open(edge.url("minilm.slm"), cache_dir=tmp_path / "cold") as model:
                    await model.layer(0)
                    passed_at_layer0 = origin_link.bytes_down
                    await model.wait_complete()
                    assert not model._session.source.whole_file_only  # type: ignore[union-attr]  # every range got a 206
                origin_statuses = origin.statuses()
                passed_cold = origin_link.bytes_down
                async with streamload.open(edge.url("minilm.slm"), cache_dir=tmp_path / "warm") as model:
                    await model.wait_complete()
                    assert not model._session.source.whole_file_only  # type: ignore[union-attr]
            finally:
                edge.stop()
        assert passed_at_layer0 < 0.8 * size, f"layer 0 waited for {passed_at_layer0} of {size} bytes to pass the edge"
        assert origin_statuses == ["200"]  # one whole-object fetch, Range stripped, for several ranged client requests
        assert origin.statuses() == origin_statuses and origin_link.bytes_down == passed_cold  # warm: the origin saw nothing
    finally:
        origin.stop()
    assert_cache_exact(tmp_path / "cold", minilm_slm)
    assert_cache_exact(tmp_path / "warm", minilm_slm)
