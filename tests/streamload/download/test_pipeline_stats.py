"""The download's statistics have one writer, the event loop: pool threads carry their seconds in each landed batch."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import streamload
from streamload.download import model_download
from streamload.download import session as session_module
from streamload.stats import DownloadStats
from tests.support.checks import journal_count
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


async def test_batches_handed_over_but_not_landed_at_a_stop_are_journaled(
    www: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while stored, verified batches wait in the download's handover (the drain had not reached them): they are
    landed and journaled by the stop, not fetched again by the next run."""

    async def never_drain(self: model_download.Download) -> None:  # the drain never reaches them
        await asyncio.Event().wait()

    monkeypatch.setattr(model_download.Download, "_drain_handover", never_drain)
    cache = tmp_path / "cache"
    with serve_directory(www) as server:
        async with streamload.open(server.url("deep.slm"), cache_dir=cache) as model:
            handover = model._session.download.handover  # test-only reach: the records waiting to be landed
            for _ in range(600):
                if len(handover.records) >= 2:
                    break
                await asyncio.sleep(0.01)
            waiting = sum(len(record.positions) for record in handover.records if not record.given_back)
            assert waiting > 0, "the download should have handed over stored batches by now"
    assert journal_count(cache) >= waiting
