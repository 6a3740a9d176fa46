"""Group commit of the cache's journal: fdatasync the store, then append what it made durable to chunks.log.

A chunk's record is appended to the journal only after its bytes are in the store and flushed to disk, so a process
killed at any point, or a power cut, leaves a journal that names only whole, verified, durable chunks.

Threads: ``GroupCommitter``'s methods run on the event loop; each commit runs on its one thread ("streamload-commit").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CacheError
from ..stats import DownloadStats
from .files import JOURNAL_DTYPE

if TYPE_CHECKING:
    from .model_cache import ModelCache

logger = logging.getLogger(__name__)

# Group commit: fdatasync the store, then journal what it made durable; a power cut loses at most
# the chunks stored since the last commit. While the network is the bottleneck (receivers waited
# for at least NETWORK_BOUND_WAIT_SHARE of the time since the last commit) commits cost nothing
# and come every COMMIT_INTERVAL_S; while the CPU is, the writeback they force competes with the
# pipeline (`python tools/bench_fetch.py` on loopback measures the difference), so they come every
# COMMIT_MAX_INTERVAL_S.
COMMIT_INTERVAL_S = 1.0
COMMIT_MAX_INTERVAL_S = 5.0
NETWORK_BOUND_WAIT_SHARE = 0.5


def commit_due(since_s: float, receive_wait_s: float) -> bool:
    """Whether a group commit is due ``since_s`` after the last one, receivers having waited ``receive_wait_s`` meanwhile."""
    network_bound = receive_wait_s >= NETWORK_BOUND_WAIT_SHARE * since_s
    return since_s >= COMMIT_MAX_INTERVAL_S or (since_s >= COMMIT_INTERVAL_S and network_bound)


class GroupCommitter:
    """Journals stored chunks in groups on its own thread, when ``commit_due`` says so (event-loop methods)."""

    def __init__(self, cache: ModelCache, loop: asyncio.AbstractEventLoop, stats: DownloadStats) -> None:
        self.cache = cache
        self.loop = loop
        self.stats = stats  # its receive_wait_s (receivers' summed waiting) tells network-bound from CPU-bound
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-commit")
        self._pending: list[np.ndarray] = []  # JOURNAL_DTYPE records: written to the store, not yet durable and journaled
        self.running: asyncio.Future[None] | None = None
        self.failed: asyncio.Future[None] = loop.create_future()  # gets the first commit failure
        self.commit_s = 0.0
        self._last_commit = time.perf_counter()
        self._wait_at_commit = stats.receive_wait_s

    def add_columns(self, indices: Sequence[int], digests: Sequence[int]) -> None:
        """Chunks are verified and written: journal them (index, xxh3 of the stored bytes) with the next group.
        A batch comes as two columns (no Python object per chunk)."""
        records = np.empty(len(indices), JOURNAL_DTYPE)
        records["index"] = indices
        records["digest"] = np.array(digests, np.uint64)
        self._pending.append(records)
        self._maybe_commit()

    def _take_pending(self) -> np.ndarray:
        batch = np.concatenate(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending = []
        return batch

    def _maybe_commit(self) -> None:
        if self.running is not None or not self._pending or self.failed.done():
            return
        if commit_due(time.perf_counter() - self._last_commit, self.stats.receive_wait_s - self._wait_at_commit):
            self._start()

    def _start(self) -> None:
        batch = self._take_pending()
        started = time.perf_counter()
        self.running = self.loop.run_in_executor(self.pool, self.cache.commit_chunks, batch)
        self.running.add_done_callback(lambda done: self._committed(done, started))

    def _committed(self, done: asyncio.Future[None], started: float) -> None:
        self.running = None
        self._last_commit = time.perf_counter()
        self._wait_at_commit = self.stats.receive_wait_s
        self.commit_s += self._last_commit - started
        if not done.cancelled() and done.exception() is not None:
            if not self.failed.done():
                self.failed.set_exception(done.exception())  # type: ignore[arg-type]
                self.failed.exception()  # retrieved: a failure nobody awaits is not "never retrieved"
            return
        self._maybe_commit()

    async def watch(self) -> None:
        """Raises the first commit failure (a full disk): run beside the download, cancel when it ends."""
        await asyncio.shield(self.failed)

    async def flush(self) -> None:
        """Commit everything written so far and wait for it; raises a commit failure."""
        while self.running is not None or self._pending:
            if self.running is None:
                self._start()
            running = self.running
            assert running is not None
            await asyncio.wait([running])
            if self.failed.done():
                await self.failed

    async def mark_complete(self) -> None:
        await self.loop.run_in_executor(self.pool, self.cache.mark_complete)

    async def close(self) -> None:
        """After a stop or a failure: keep what is verified and written (a failure to is logged), then end the thread."""
        if self.running is not None:
            await asyncio.wait([self.running])
        if self._pending and not self.failed.done():
            batch = self._take_pending()
            try:
                await self.loop.run_in_executor(self.pool, self.cache.commit_chunks, batch)
            except CacheError as exc:
                logger.warning("could not save %d downloaded chunks to the cache: %s", len(batch), exc)
        self.pool.shutdown(wait=True)
