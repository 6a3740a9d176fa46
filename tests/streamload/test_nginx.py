"""The client against nginx serving a directory of .slm files: the way users scale out."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.formats import ModelReader
from streamload.runtime import run
from tests.support.checks import start_nginx


@pytest.fixture(params=[True, False], ids=["ranges", "max_ranges_0"])
def nginx(request: pytest.FixtureRequest, tmp_path: Path, llama_slm: Path, minilm_slm: Path) -> Iterator[tuple[str, Path, bool]]:
    root = tmp_path / "www"
    root.mkdir()
    shutil.copy(llama_slm, root / "llama.slm")
    shutil.copy(minilm_slm, root / "minilm.slm")
    work = tmp_path / "nginx"
    work.mkdir()
    process, port = start_nginx(work, root, request.param)
    try:
        yield f"http://127.0.0.1:{port}", work, request.param
    finally:
        process.terminate()
        process.wait(10)


async def test_client_works_unchanged_against_nginx(nginx: tuple[str, Path, bool], tmp_path: Path, llama_slm: Path) -> None:
    base, work, ranges = nginx
    async with streamload.open(f"{base}/llama.slm", cache_dir=tmp_path / "cache") as model:
        layers = {i: layer async for i, layer in model.layers()}
        stats = await model.wait_complete()
    assert stats.chunks_fetched == stats.chunks_total
    with ModelReader(llama_slm) as reader:
        for index, layer in layers.items():
            for name, values in reader.read_tensors(index).items():
                np.testing.assert_array_equal(layer[name], values)
    statuses = [line.split('"')[2].split()[0] for line in (work / "access.log").read_text().splitlines()]
    assert set(statuses) == ({"206"} if ranges else {"200"})  # nginx really did (not) honour Range


async def test_streamed_run_through_nginx(nginx: tuple[str, Path, bool], tmp_path: Path) -> None:
    base, _, _ = nginx
    async with streamload.open(f"{base}/minilm.slm", cache_dir=tmp_path / "cache") as model:
        result = await run(model, texts=["served by nginx"])
    assert result.embedding is not None and abs(float(np.linalg.norm(result.embedding)) - 1.0) < 1e-5


async def test_a_complete_model_is_revalidated_with_a_304(nginx: tuple[str, Path, bool], tmp_path: Path) -> None:
    """The second open of a complete model asks nginx If-None-Match: 304, nothing downloaded (nginx's log says 304)."""
    base, work, _ = nginx
    for _ in range(2):
        async with streamload.open(f"{base}/llama.slm", cache_dir=tmp_path / "cache") as model:
            stats = await model.wait_complete()
    assert stats.bytes_downloaded == 0 and stats.chunks_fetched == 0
    statuses = [line.split('"')[2].split()[0] for line in (work / "access.log").read_text().splitlines()]
    # nginx logs a request when it ends: a first-open request the client closed early may be logged after the 304
    assert statuses.count("304") == 1, statuses
