"""The download's statistics have one writer, the event loop: pool threads carry their seconds in each landed batch."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import streamload
from streamload.download import session as session_module
from streamload.stats import DownloadStats
from tests.support.serving import serve_directory


class _WriterCheckedStats(DownloadStats):
    """DownloadStats that records every field written from a thread other than the one that made it."""

    def __init__(self) -> None:
        object.__setattr__(self, "owner", threading.get_ident())
        object.__setattr__(self, "foreign_writes", [])
        super().__init__()

    def __setattr__(self, name: str, value: object) -> None:
        if threading.get_ident() != self.owner:
            self.foreign_writes.append((name, threading.current_thread().name))
        super().__setattr__(name, value)


@pytest.mark.parametrize("name", ["minilm.slm", "deep.slm"])
async def test_pool_threads_never_write_the_stats(www: Path, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[_WriterCheckedStats] = []

    def make_stats() -> _WriterCheckedStats:
        made.append(_WriterCheckedStats())
        return made[-1]

    monkeypatch.setattr(session_module, "DownloadStats", make_stats)
    with serve_directory(www) as server:
        async with streamload.open(server.url(name), cache_dir=tmp_path, verify_threads=8) as model:
            stats = await model.wait_complete()
    assert made and stats.chunks_fetched == stats.chunks_total > 8
    assert stats.verify_s > 0 and stats.decompress_s > 0 and stats.store_s > 0 and stats.receive_wait_s > 0
    assert made[0].foreign_writes == []  # before the fix: receive_wait_s, verify_s, ... written by streamload-verify threads
