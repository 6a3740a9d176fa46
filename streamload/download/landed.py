"""What a batch of chunks became in the pipeline, and the queue that carries it from pool threads to the event loop.

Pool threads ``post`` a batch's ``Landed`` record; the event loop is woken once per batch at most (no wake-up while
one is pending), never once per chunk.
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
        self._event = asyncio.Event()
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
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event.clear()
