"""The cache on its own: the journal survives torn records, and the group-commit policy and committer."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD, ModelCache
from streamload.cache.journal import GroupCommitter, commit_due
from streamload.errors import CacheError
from streamload.stats import DownloadStats

DIGEST = "ab" * 32


@pytest.mark.parametrize(
    ("since_s", "waited_s", "due"),
    [(0.5, 0.5, False), (1.2, 1.0, True), (1.2, 0.2, False), (4.9, 0.0, False), (5.1, 0.0, True), (2.0, 6.0, True)],
)
def test_group_commits_come_every_second_on_a_slow_link_and_every_five_when_the_cpu_is_the_limit(
    since_s: float, waited_s: float, due: bool
) -> None:
    assert commit_due(since_s, waited_s) is due


async def open_cache(root: Path, size_bytes: int = 4096) -> ModelCache:
    cache = ModelCache(root, DIGEST)
    await cache.acquire()
    cache.open_store(size_bytes)
    return cache


async def test_the_journal_names_only_committed_chunks_and_drops_a_torn_record(tmp_path: Path) -> None:
    cache = await open_cache(tmp_path)
    cache.write_chunks(0, [b"x" * 100, b"y" * 28])
    cache.commit_chunks([(0, 11), (3, 33)])
    cache.close()
    with open(tmp_path / "models" / DIGEST / JOURNAL_NAME, "ab") as f:
        f.write(JOURNAL_RECORD.pack(9, 99)[:5])  # a kill mid-record
    cache = await open_cache(tmp_path)
    assert cache.read_journal(10) == {0: 11, 3: 33}
    cache.commit_chunks([(5, 55)])  # appended after the torn tail was dropped: aligned
    assert cache.read_journal(10) == {0: 11, 3: 33, 5: 55}
    assert cache.read_journal(4) == {0: 11, 3: 33}  # indices past the manifest's chunk count are ignored
    cache.close()


async def test_the_committer_groups_chunks_and_flush_makes_them_all_durable(tmp_path: Path) -> None:
    cache = await open_cache(tmp_path)
    committer = GroupCommitter(cache, asyncio.get_running_loop(), DownloadStats())
    committer.add_columns([0, 1], [0, 1])
    committer.add_columns([2, 3, 4], [2, 3, 4])
    assert committer.running is None and cache.read_journal(10) == {}  # not due yet: grouped, nothing journaled
    await committer.flush()
    assert cache.read_journal(10) == {i: i for i in range(5)} and committer.commit_s > 0
    await committer.mark_complete()
    await committer.close()
    assert cache.is_complete()
    cache.close()


async def test_a_failing_commit_is_reported_through_watch(tmp_path: Path) -> None:
    cache = await open_cache(tmp_path)
    committer = GroupCommitter(cache, asyncio.get_running_loop(), DownloadStats())
    assert cache._journal_fd is not None
    os.close(cache._journal_fd)  # the journal can no longer be written: as a vanished disk would
    cache._journal_fd = os.open(os.devnull, os.O_RDONLY)
    committer.add_columns([1], [1])
    watcher = asyncio.create_task(committer.watch())
    with pytest.raises(CacheError, match="committing .* failed"):
        await committer.flush()
    with pytest.raises(CacheError):
        await watcher
    await committer.close()
    cache.close()


def test_a_digest_that_is_not_sha256_hex_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not a sha256 hex digest"):
        ModelCache(tmp_path, "../../etc")
