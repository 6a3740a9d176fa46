"""What a batch of chunks became, and the queues that carry it: from pool threads to the event loop, and from the
download's parts to the download.

Pool threads ``post`` a batch's ``Landed`` record; the event loop is woken once per batch at most (no wake-up while
one is pending), never once per chunk. The workers and the delta stream ``put`` what they hand their download (a
``Handed`` record per batch: chunks stored, or given back) on its ``Handover``, which the download drains: the one
completion route. Event loop only, but for ``LandedQueue.post``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np

from ..errors import ChunkIntegrityError


@dataclasses.dataclass(slots=True)
class Landed:
    """What became of one batch of chunks (positions in the span's table): stored ones with the xxh3 of their stored
    bytes, ones refused by their hash, and the pool thread's seconds on each stage (added to ``DownloadStats`` on the
    event loop as the batch lands: the stats have one writer)."""

    stored: Sequence[int]
    digests: np.ndarray  # (uint64) xxh3 of each stored chunk's bytes: what a later process checks the store against
    failed: list[tuple[int, ChunkIntegrityError]]
    size_bytes: int  # compressed bytes received for the batch
    receive_wait_s: float  # waiting for the batch's bytes on the connection
    verify_s: float  # sha256
    decompress_s: float  # zstd
    store_s: float  # pwrite into the store (refinements: folded in)


class LandedQueue:
    """Outcomes queued by pool threads for the event loop, with one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batches: collections.deque[Landed] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None  # the consumer's, resolved by the next wake-up
        self._wake_scheduled = False

    def post(self, outcomes: Landed) -> None:
        """From a pool thread: queue a batch's outcomes; wake the loop only when no wake-up is pending."""
        self.batches.append(outcomes)
        if not self._wake_scheduled:
            self._wake_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is shutting down
                self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False  # cleared before the consumer drains: a later post schedules its own wake-up
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def next_wake(self) -> asyncio.Future[None]:
        """A future the next wake-up resolves (event loop; check ``batches`` first: a wake-up that ran before this
        call found no waiter, and the batch it was for is queued)."""
        self.waiter = self.loop.create_future()
        return self.waiter


@dataclasses.dataclass(slots=True)
class Handed:
    """What a part hands its download for one batch: chunks stored (positions in the download's table, with the xxh3
    of their stored bytes), or chunks to fetch whole (``given_back``)."""

    positions: Sequence[int]
    digests: Sequence[int] = ()
    fetched: Landed | None = None  # fetched through the pipeline: the batch, with its pool thread's seconds per stage
    saved_bytes: int = 0  # rebuilt from a delta file: the compressed bytes its frames saved
    given_back: bool = False  # the delta file could not give them


class Handover:
    """The download's queue of what its workers and delta stream hand it, drained by the download (event loop)."""

    def __init__(self) -> None:
        self.records: collections.deque[Handed] = collections.deque()
        self._event = asyncio.Event()

    def put(self, record: Handed) -> None:
        self.records.append(record)
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
