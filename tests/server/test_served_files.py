"""What the bundled server serves from its directory: .slm models directly inside it, nothing else, whatever the
directory holds (symlink loops, links to other files, FIFOs), over real loopback sockets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import aiohttp

from tests.support.serving import serve_directory


async def get(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(url) as response:
            return response.status, await response.read()


async def test_a_symlink_loop_in_the_directory_is_skipped_not_a_500_for_everyone(tmp_path: Path, llama_slm: Path) -> None:
    (tmp_path / "llama.slm").write_bytes(llama_slm.read_bytes())
    os.symlink("loop.slm", tmp_path / "loop.slm")  # loop.slm -> loop.slm
    os.symlink("pong.slm", tmp_path / "ping.slm")
    os.symlink("ping.slm", tmp_path / "pong.slm")
    with serve_directory(tmp_path) as server:
        index_status, index = await get(server.url())
        loop_status, _ = await get(server.url("loop.slm"))
        model_status, body = await get(server.url("llama.slm"))
    assert index_status == 200 and [m["name"] for m in json.loads(index)["models"]] == ["llama.slm"]
    assert loop_status == 404
    assert model_status == 200 and body == llama_slm.read_bytes()


async def test_files_that_are_not_models_are_neither_served_nor_listed(tmp_path: Path, llama_slm: Path) -> None:
    """A link named like a model to a secret beside the directory or inside it, a non-model file named .slm, a FIFO:
    404 and absent from the index. A link inside the directory to a real model is served."""
    served = tmp_path / "www"
    served.mkdir()
    (served / "llama.slm").write_bytes(llama_slm.read_bytes())
    (served / ".env").write_text("API_KEY=hunter2\n")
    os.symlink(".env", served / "env.slm")  # inside the directory, but not a model
    (tmp_path / "secret.slm").write_bytes(llama_slm.read_bytes())  # a model, but outside the directory
    os.symlink(tmp_path / "secret.slm", served / "outside.slm")
    (served / "notes.slm").write_text("API_KEY=hunter2\n" * 10)
    os.mkfifo(served / "fifo.slm")
    os.symlink("llama.slm", served / "alias.slm")
    with serve_directory(served) as server:
        statuses = {name: (await get(server.url(name)))[0] for name in ("env.slm", "outside.slm", "notes.slm", "fifo.slm")}
        alias_status, alias_body = await get(server.url("alias.slm"))
        _, index = await get(server.url())
    assert statuses == dict.fromkeys(statuses, 404)
    assert alias_status == 200 and alias_body == llama_slm.read_bytes()
    assert sorted(m["name"] for m in json.loads(index)["models"]) == ["alias.slm", "llama.slm"]
    assert b"hunter2" not in index
