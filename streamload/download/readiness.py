"""What the caller of one download can wait for: each layer exact and at its coarse levels, single chunks (rows),
the whole model; and the progress reports.

Counts of the chunks each layer still lacks go down as batches of chunks land (``landed``) and up again when
cached chunks turn out damaged (``reopen``); a layer's future resolves when its count reaches zero. A failure is
delivered to every future (``fail``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..formats import ChunkEntry
from ..stats import DownloadStats, Progress

PROGRESS_INTERVAL_S = 0.1


class Readiness:
    """Per layer: chunks not yet stored (refinements included), pass-0 chunks not yet stored; and their futures."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        remaining: list[int],
        remaining_coarse: list[int],
        started: float,
        stats: DownloadStats,
        progress: Callable[[Progress], None] | None,
        bytes_to_download: int,
        bytes_cached: int,
    ) -> None:
        self.loop = loop
        self.remaining = remaining
        self.remaining_coarse = remaining_coarse
        self.started = started
        self.stats = stats
        self.progress_callback = progress
        self.ready = [loop.create_future() for _ in remaining]
        self.ready_s: list[float | None] = [None] * len(remaining)
        self.coarse_ready = [loop.create_future() for _ in remaining]
        self.coarse_ready_s: list[float | None] = [None] * len(remaining)
        self.chunk_waiters: dict[int, asyncio.Future[None]] = {}  # chunk index -> resolved when it is stored
        self.complete: asyncio.Future[None] = loop.create_future()
        self.bytes_to_download = bytes_to_download  # compressed bytes the cache lacked when the model was opened
        self.bytes_cached = bytes_cached  # and held
        self._last_progress = 0.0
        for index, count in enumerate(remaining_coarse):
            if count == 0:
                self.set_coarse_ready(index)
        for index, count in enumerate(remaining):
            if count == 0:
                self.set_ready(index)

    def set_ready(self, index: int) -> None:
        self.set_coarse_ready(index)
        if not self.ready[index].done():
            self.ready[index].set_result(None)
            self.ready_s[index] = time.perf_counter() - self.started

    def set_coarse_ready(self, index: int) -> None:
        if not self.coarse_ready[index].done():
            self.coarse_ready[index].set_result(None)
            self.coarse_ready_s[index] = time.perf_counter() - self.started

    def wait_for_chunks(self, indices: Sequence[int]) -> list[asyncio.Future[None]]:
        """A future per chunk index, resolved when that chunk is stored."""
        waiters = []
        for index in indices:
            waiter = self.chunk_waiters.get(index)
            if waiter is None:
                waiter = self.chunk_waiters[index] = self.loop.create_future()
            waiters.append(waiter)
        return waiters

    def awaits_chunks(self) -> bool:
        """Whether a caller waits for single chunks (rows) not yet stored."""
        return bool(self.chunk_waiters)

    def landed(self, layers: np.ndarray, passes: np.ndarray, indices: np.ndarray) -> None:
        """A batch of chunks was stored: their layers' counts go down (columns: layer, pass, chunk index)."""
        remaining, remaining_coarse = self.remaining, self.remaining_coarse
        if not len(layers):
            return
        if (layers[0], passes[0]) == (layers[-1], passes[-1]):
            layer_index = int(layers[0])  # a batch within one layer and pass (each is contiguous in file order)
            if not passes[0]:
                remaining_coarse[layer_index] -= len(layers)
                if remaining_coarse[layer_index] == 0:
                    self.set_coarse_ready(layer_index)
            remaining[layer_index] -= len(layers)
            if remaining[layer_index] == 0:
                self.set_ready(layer_index)
        else:
            for layer_index, count in zip(*np.unique(layers[passes == 0], return_counts=True), strict=True):
                remaining_coarse[layer_index] -= int(count)
                if remaining_coarse[layer_index] == 0:
                    self.set_coarse_ready(int(layer_index))
            for layer_index, count in zip(*np.unique(layers, return_counts=True), strict=True):
                remaining[layer_index] -= int(count)
                if remaining[layer_index] == 0:
                    self.set_ready(int(layer_index))
        waiters = self.chunk_waiters
        if waiters:
            for index in indices.tolist():
                waiter = waiters.pop(index, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    def reopen(self, chunks: Sequence[ChunkEntry]) -> list[int]:
        """Chunks counted as stored are missing again (damaged in the cache): their layers wait again. Returns the
        layers concerned."""
        for chunk in chunks:
            self.remaining[chunk.layer_index] += 1
            if not chunk.pass_index:
                self.remaining_coarse[chunk.layer_index] += 1
        layers = sorted({c.layer_index for c in chunks})
        for index in layers:
            if self.ready[index].done():
                self.ready[index] = self.loop.create_future()
                self.ready_s[index] = None
            if self.remaining_coarse[index] and self.coarse_ready[index].done():
                self.coarse_ready[index] = self.loop.create_future()
                self.coarse_ready_s[index] = None
        return layers

    def restart(self) -> None:
        """A download starts again (for chunks reopened): the model is not complete until it ends."""
        if self.complete.done():
            self.complete = self.loop.create_future()

    def fail_layers(self, layers: Sequence[int], failure: BaseException, *, coarse: bool = False) -> None:
        """These layers' futures get ``failure`` (``coarse``: their coarse levels' futures too)."""
        for index in layers:
            futures = (self.ready[index], self.coarse_ready[index]) if coarse else (self.ready[index],)
            for future in futures:
                if not future.done():
                    future.set_exception(failure)
                    future.exception()  # retrieved here: a failure nobody awaits is not "never retrieved"

    def fail_complete(self, failure: BaseException) -> None:
        """The whole model cannot be had (the layers and rows that are here still can)."""
        if not self.complete.done():
            self.complete.set_exception(failure)
            self.complete.exception()

    def count_rebuilt(self, saved_bytes: int) -> None:
        """Chunks were rebuilt from a delta file: what they saved counts as cached for the progress reports."""
        self.bytes_cached += saved_bytes

    def finish(self) -> None:
        """Every chunk is verified and stored: the model is usable (durability follows, before close() returns)."""
        if self.complete.done():
            return
        self.stats.seconds = time.perf_counter() - self.started
        self.complete.set_result(None)
        self.report_progress(force=True)

    def fail(self, exc: BaseException) -> None:
        for future in (*self.ready, *self.coarse_ready, *self.chunk_waiters.values(), self.complete):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here: a failure nobody awaits is not "never retrieved"

    def report_progress(self, force: bool = False) -> None:
        if self.progress_callback is None:
            return
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        self.progress_callback(
            Progress(
                bytes_downloaded=self.stats.bytes_downloaded,
                bytes_to_download=self.bytes_to_download,
                layers_ready=sum(1 for f in self.ready if f.done() and not f.exception()),
                layers_total=len(self.ready),
                elapsed_s=now - self.started,
                bytes_cached=self.bytes_cached,
                bytes_total=self.stats.bytes_total,
            )
        )
