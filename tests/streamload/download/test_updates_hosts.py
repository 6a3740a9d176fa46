"""Updates from nginx (any static host serves a delta file: it is bytes beside the model), ranges on and off."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamload.formats import convert
from tests.support.checks import assert_cache_exact, start_host_or_skip
from tests.support.finetune import CHUNK_BYTES, TINY_LLAMA, fetch_json, header_bytes, write_version
from tests.support.hosts import public_directory

pytestmark = pytest.mark.hosts


@pytest.fixture(scope="module")
def public_versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("hosted")
    convert(TINY_LLAMA, work / "v1.slm", chunk_size_bytes=CHUNK_BYTES)
    convert(write_version(TINY_LLAMA, work / "ft", move=0.02), work / "ft.slm", chunk_size_bytes=CHUNK_BYTES, base=work / "v1.slm")
    directory = public_directory(sorted(work.glob("*.slm*")))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("ranges", [True, False])
def test_an_update_from_nginx_moves_its_delta_and_is_exact(public_versions: Path, tmp_path: Path, ranges: bool) -> None:
    host = start_host_or_skip("nginx", tmp_path / "nginx", public_versions, ranges=ranges)
    cache = tmp_path / "cache"
    try:
        fetch_json(host.url("v1.slm"), cache)
        report = fetch_json(host.url("ft.slm"), cache)
    finally:
        host.stop()
    delta = next(public_versions.glob("*.slmd"))
    assert report["chunks_delta"] == report["chunks_total"] and report["chunks_whole"] == 0
    assert report["bytes_delta"] == delta.stat().st_size and report["bytes_whole"] == header_bytes(public_versions / "ft.slm")
    assert set(host.statuses()) == ({"206"} if ranges else {"200"})
    assert_cache_exact(cache, public_versions / "ft.slm")
