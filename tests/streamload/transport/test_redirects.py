"""Model hubs and presigned URLs: redirects followed for every ranged request, re-resolved on expiry, tokens kept home."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.cli import main
from streamload.runtime import run
from streamload.transport.httputil import check_headers, same_origin
from tests.support.checks import RECEIVE_PATHS, assert_cache_exact, open_via
from tests.support.hub import Hub, Store
from tests.support.serving import ServerThread

FAST_RETRY = streamload.RetryPolicy(max_attempts=4, base_delay_s=0.05, max_delay_s=0.2, stall_timeout_s=2.0)
TOKEN = "hf_s3cret"


@pytest.fixture
def hub(www: Path) -> Iterator[tuple[Hub, Store, ServerThread]]:
    """The hub on 127.0.0.1 redirecting to the store on localhost (another host, another port)."""
    store = Store(www)
    with ServerThread(store.app()) as store_server:
        hub = Hub(store_server.port)
        with ServerThread(hub.app()) as hub_server:
            yield hub, store, hub_server


@RECEIVE_PATHS
async def test_streamed_run_through_a_hub_redirect_to_signed_storage(
    hub: tuple[Hub, Store, ServerThread], minilm_slm: Path, tmp_path: Path, receive_path: str
) -> None:
    hub_log, store, server = hub[0].log, hub[1], hub[2]
    url = server.url("models/minilm.slm")
    async with open_via(receive_path, url, cache_dir=tmp_path / "cache") as model:
        streamed = await run(model, texts=["served through a redirect"])
        await model.wait_complete()
    async with streamload.open(minilm_slm, cache_dir=tmp_path / "local") as model:
        local = await run(model, texts=["served through a redirect"])
    np.testing.assert_array_equal(streamed.embedding, local.embedding)
    assert_cache_exact(tmp_path / "cache", minilm_slm)
    # one chain resolved (hub, then its /resolve hop); every ranged request then went straight to the signed URL
    assert [(path, status) for path, status, _ in hub_log] == [("/models/minilm.slm", 302), ("/resolve/minilm.slm", 302)]
    assert len(store.log) >= 2 and all(status == 206 and ranges for status, ranges, _ in store.log)
    # the identity is the manifest digest, not the signed URL: a new run gets a new signature and uses the cache
    async with streamload.open(url, cache_dir=tmp_path / "cache") as model:
        assert (await model.wait_complete()).chunks_fetched == 0
    assert len(hub_log) == 4


@RECEIVE_PATHS
async def test_an_expired_signed_url_is_resolved_again_from_the_hub(
    hub: tuple[Hub, Store, ServerThread], deep_slm: Path, tmp_path: Path, receive_path: str
) -> None:
    hub_, store, server = hub
    hub_.expiry_s = 0.2  # each signed URL expires before its response is cut: every later request needs a new one
    store.cut_after_bytes, store.cut_delay_s = 256 << 10, 0.3
    async with open_via(receive_path, server.url("models/deep.slm"), cache_dir=tmp_path, retry=FAST_RETRY) as model:
        stats = await model.wait_complete()
    assert_cache_exact(tmp_path, deep_slm)
    statuses = [status for status, _, _ in store.log]
    resolved = [path for path, status, _ in hub_.log if path.startswith("/resolve/")]
    assert statuses.count(403) >= 2 and len(resolved) == statuses.count(403) + 1
    assert stats.chunks_fetched == stats.chunks_total  # no chunk fetched twice, none lost


@pytest.mark.parametrize(("command", "how"), [("fetch", "--header"), ("run", "env")])
def test_a_private_models_token_goes_to_the_hub_and_never_to_storage(
    hub: tuple[Hub, Store, ServerThread], minilm_slm: Path, tmp_path: Path, command: str, how: str
) -> None:
    hub_, store, server = hub
    hub_.token = TOKEN
    argv = [sys.executable, "-m", "streamload.cli", command, server.url("models/minilm.slm"), "--cache-dir", str(tmp_path), "--json"]
    argv += ["--text", "private"] if command == "run" else []
    env = {k: v for k, v in os.environ.items() if k != "STREAMLOAD_TOKEN"}
    if how == "env":
        env["STREAMLOAD_TOKEN"] = TOKEN
    else:
        argv += ["--header", f"Authorization: Bearer {TOKEN}"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bytes_downloaded"] > 0
    assert_cache_exact(tmp_path, minilm_slm)
    assert hub_.log and all(auth == f"Bearer {TOKEN}" for _, _, auth in hub_.log)  # both hub hops: the same origin
    assert store.log and all(auth is None for _, _, auth in store.log)  # never the other host (it would answer 400)


def test_a_private_model_without_its_token_is_a_clear_error(
    hub: tuple[Hub, Store, ServerThread], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STREAMLOAD_TOKEN", raising=False)
    hub[0].token = TOKEN
    assert main(["fetch", hub[2].url("models/minilm.slm"), "--cache-dir", str(tmp_path), "--quiet"]) == 1
    assert "answered 401" in capsys.readouterr().err


async def test_a_redirect_loop_is_an_error(hub: tuple[Hub, Store, ServerThread], tmp_path: Path) -> None:
    hub[0].loop_forever = True
    with pytest.raises(streamload.HTTPStatusError, match="redirected more than 10 times"):
        async with streamload.open(hub[2].url("models/minilm.slm"), cache_dir=tmp_path, retry=FAST_RETRY):
            pass


def test_headers_that_cannot_be_sent_are_refused() -> None:
    assert check_headers({"Authorization": "Bearer x "}) == {"Authorization": "Bearer x"}
    for bad in ({"Authorization": "Bearer x\r\nHost: evil"}, {"Range": "bytes=0-"}, {"Bad Name": "x"}):
        with pytest.raises(streamload.StreamloadError):
            check_headers(bad)
    assert same_origin("http://hub:80/a", "http://hub/b?x=1") and not same_origin("http://hub/a", "http://hub:8080/a")
    assert not same_origin("https://hub/a", "http://hub/a") and not same_origin("http://hub/a", "http://cdn.hub/a")


def test_a_weak_etag_then_its_strong_form_is_the_same_file() -> None:
    """Apache tags a file modified in the last second weakly, later strongly: the same file, not a replaced one."""
    from types import SimpleNamespace

    from streamload.errors import FileChangedError
    from streamload.transport.http_source import HttpSource

    source = HttpSource("http://127.0.0.1:1/m.slm", streamload.RetryPolicy())
    for tag in ('W/"a"', '"a"', '"a"', 'W/"other"', None):
        source._check_identity(SimpleNamespace(etag=tag, close=lambda: None))  # type: ignore[arg-type]
    assert source.etags == {"http://127.0.0.1:1": '"a"'}  # the strong form, for If-Range
    with pytest.raises(FileChangedError, match=r'ETag "a" -> "b"'):
        source._check_identity(SimpleNamespace(etag='"b"', close=lambda: None))  # type: ignore[arg-type]
