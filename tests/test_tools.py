"""The tools: each one starts (its imports resolve, its --help prints), and the link emulator (tools/linkproxy.py) in
front of both servers users run: the bundled one and nginx."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

import streamload
from tests.support.checks import start_link, start_nginx
from tests.support.paths import ROOT
from tests.support.serving import serve_directory

TOOLS = sorted((ROOT / "tools").glob("*.py"))
NEEDS_TORCH = {"make_family_references.py", "make_reference.py"}  # they import torch at the top: it makes references


@pytest.mark.parametrize("tool", TOOLS, ids=lambda path: path.name)
def test_every_tool_starts_and_prints_its_help(tool: Path) -> None:
    """A tool whose import broke (a helper module moved) fails here, not on the day someone runs its benchmark."""
    if tool.name in NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        pytest.skip("makes references with torch, which the tests never need")
    done = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout.lower(), done.stdout[:500]


@pytest.mark.parametrize("server_kind", ["bundled", "nginx"])
async def test_link_paces_any_server(server_kind: str, tmp_path: Path, llama_slm: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "llama.slm").write_bytes(llama_slm.read_bytes())
    size = llama_slm.stat().st_size
    rate_mbit = size * 8 / 1e6 / 0.8  # the whole file should take 0.8 s on the link
    if server_kind == "bundled":
        server = serve_directory(root).start()
        port, stop = server.port, server.stop
    else:
        (tmp_path / "nginx").mkdir()
        process, port = start_nginx(tmp_path / "nginx", root, True)
        stop = process.terminate
    link, link_port = start_link(port, rate_mbit, rtt_ms=100)
    try:
        started = time.perf_counter()
        async with streamload.open(f"http://127.0.0.1:{link_port}/llama.slm", cache_dir=tmp_path / "cache") as model:
            stats = await model.wait_complete()
        elapsed = time.perf_counter() - started
    finally:
        link.terminate()
        link.wait()
        stop()
    assert stats.chunks_fetched == stats.chunks_total
    assert elapsed >= 0.8 + 0.1  # never faster than bytes / rate plus one round trip
