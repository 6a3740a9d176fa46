"""The client against nginx serving a directory of .slm files: the way users scale out."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.formats import ModelReader
from streamload.runtime import run
from tests.checks import free_port, wait_for_port

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp-body;
    proxy_temp_path {work}/tmp-proxy;
    fastcgi_temp_path {work}/tmp-fastcgi;
    uwsgi_temp_path {work}/tmp-uwsgi;
    scgi_temp_path {work}/tmp-scgi;
    types {{ application/octet-stream slm; }}
    sendfile on;
    tcp_nopush off;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        {ranges}
        location / {{ }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is missing: .ci/run installs nginx-light")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    return found


def start_nginx(work: Path, root: Path, ranges: bool) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(work=work, port=port, root=root, ranges="" if ranges else "max_ranges 0;"))
    process = subprocess.Popen([nginx_binary(), "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")])
    if wait_for_port(port):
        return process, port
    process.kill()
    raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text() if (work / 'error.log').exists() else ''}")


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
