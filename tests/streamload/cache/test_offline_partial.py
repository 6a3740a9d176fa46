"""Offline, a partial cache is used for what it holds: the input's layers and rows. By URL, by name and with --digest;
when it lacks what the input needs, the error says what and how much, and that a connection would fetch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from streamload.formats import ModelReader
from tests.support.serving import serve_directory

STREAMLOAD = str(Path(sys.executable).parent / "streamload")


def streamload_cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STREAMLOAD_CACHE=str(cache))
    return subprocess.run([STREAMLOAD, *args], capture_output=True, text=True, timeout=120, env=env)


def test_a_partial_cache_serves_the_input_it_holds_offline(www: Path, tmp_path: Path, minilm_slm: Path) -> None:
    digest = ModelReader(minilm_slm).manifest.digest
    with serve_directory(www, rate_bytes_per_s=4_000_000) as server:  # slow enough for --no-finish to leave it partial
        url = server.url("minilm.slm")
        online = streamload_cli("run", url, "hello world", "--no-finish", "--json", cache=tmp_path)
        assert online.returncode == 0, online.stderr
    (row,) = json.loads(streamload_cli("list", "--json", cache=tmp_path).stdout)
    assert row["status"].startswith("partial"), row
    embedding = json.loads(online.stdout)["embedding"]
    for how in ([url], ["minilm"], [url, "--digest", digest]):
        offline = streamload_cli("run", *how, "hello world", "--json", cache=tmp_path)
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout)["embedding"] == embedding
        assert "partial cached copy" in offline.stderr and "the cache stays partial" in offline.stderr
    lacking = streamload_cli("run", url, "zebra xylophone quantum", "--no-finish", cache=tmp_path)
    assert lacking.returncode == 1 and "Traceback" not in lacking.stderr
    assert "not in the cache" in lacking.stderr and "bytes" in lacking.stderr and "a connection would fetch them" in lacking.stderr
    fetch = streamload_cli("fetch", url, cache=tmp_path)
    assert fetch.returncode == 1 and "lacks" in fetch.stderr and "a connection would fetch them" in fetch.stderr, fetch.stderr
