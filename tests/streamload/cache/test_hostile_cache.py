"""A cache an attacker (or a crash, or another tool) rearranged: whatever a model directory holds, the model run is the
one its name (the manifest digest) says, or it is fetched again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import streamload
from tests.support.checks import assert_cache_exact
from tests.support.serving import ServerThread


async def fill_cache(url: str, cache: Path) -> str:
    async with streamload.open(url, cache_dir=cache) as model:
        await model.wait_complete()
        return model.digest


async def test_a_model_directory_holding_another_models_header_is_fetched_again(server: ServerThread, www: Path, tmp_path: Path) -> None:
    """The server's 304 says the URL's model is unchanged; the cached header in that model's directory is another
    model's: it is a damaged header, fetched again, whether the run is pinned or not (and the server is not blamed)."""
    url = server.url("minilm.slm")
    digest = await fill_cache(url, tmp_path)
    other = await fill_cache(server.url("deep.slm"), tmp_path)
    models = tmp_path / "models"
    for source in (url, f"{url}#sha256={digest}"):
        (models / digest / "header.slm").write_bytes((models / other / "header.slm").read_bytes())
        async with streamload.open(source, cache_dir=tmp_path) as model:
            assert model.digest == digest
            await model.wait_complete()
        assert (models / digest / "header.slm").read_bytes() != (models / other / "header.slm").read_bytes()  # written again
    assert_cache_exact(tmp_path, www / "minilm.slm")


async def test_list_shows_a_directory_holding_another_models_header_as_damaged(server: ServerThread, tmp_path: Path) -> None:
    digest = await fill_cache(server.url("minilm.slm"), tmp_path)
    other = await fill_cache(server.url("deep.slm"), tmp_path)
    models = tmp_path / "models"
    (models / digest / "header.slm").write_bytes((models / other / "header.slm").read_bytes())
    env = {"STREAMLOAD_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "streamload.cli", "list", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {row["digest"]: row for row in json.loads(done.stdout)}
    assert rows[digest]["architecture"] == "damaged" and rows[other]["architecture"] == "llama"
