"""Per-layer timing of a streamed run: when each layer was ready, and when its compute started and ended."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from ..layer import Layer, distinct_rows

if TYPE_CHECKING:
    from ..model import Model

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class LayerTiming:
    """Seconds from the start of the run."""

    index: int
    name: str
    ready_s: float  # every chunk of the layer verified and stored
    compute_start_s: float
    compute_done_s: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class RowsTiming:
    """Rows of a row table an input needed (``Model.rows``); seconds from the start of the run."""

    index: int  # the row table's layer
    name: str
    rows: int  # distinct rows asked for
    asked_s: float
    ready_s: float  # every chunk holding them verified and stored

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Timeline:
    """Runs each layer's compute as soon as that layer has arrived, off the event loop, and records when."""

    def __init__(self, model: Model, started: float | None = None) -> None:
        self.model = model
        self.started = time.perf_counter() if started is None else started
        self.records: list[LayerTiming] = []
        self.row_records: list[RowsTiming] = []

    def now_s(self) -> float:
        return time.perf_counter() - self.started

    async def compute(self, index: int, fn: Callable[..., T], *args: Any) -> tuple[Layer, T]:
        """Await layer ``index``, then run ``fn(layer, *args)`` on a worker thread (numpy/BLAS release the GIL)."""
        layer = await self.model.layer(index)
        ready_after_open = self.model.layer_ready_s[index] or 0.0
        ready = max(0.0, self.model.opened_at + ready_after_open - self.started)
        start = self.now_s()
        result = await asyncio.to_thread(fn, layer, *args)
        self.records.append(LayerTiming(index, layer.name, ready, start, self.now_s()))
        return layer, result

    async def rows(self, name: str, ids: Any) -> tuple[Any, Any]:
        """Await the rows ``ids`` of table ``name`` (``Model.rows``: fetched first) and record when they arrived."""
        asked = self.now_s()
        values, scales = await self.model.rows(name, ids)
        entry = self.model.manifest.tensor(name)
        rows = len(distinct_rows(ids))
        name_of_layer = self.model.manifest.layers[entry.layer_index].name
        self.row_records.append(RowsTiming(entry.layer_index, name_of_layer, rows, asked, self.now_s()))
        return values, scales

    async def compute_chain(self, indices: Iterable[int], fn: Callable[[Layer, int, T], T], value: T) -> T:
        """Fold ``value = fn(layer, index, value)`` over the layers ``indices``, in order.

        When every one of those layers is already here (a cached model), the whole chain runs on one worker
        thread: one hand-off per pass instead of one per layer, which a busy machine makes expensive. Otherwise
        each step awaits its layer and runs on a worker thread as ``compute`` does, so the download goes on.
        """
        order = list(indices)
        ready_s = self.model.layer_ready_s
        if any(ready_s[index] is None for index in order):
            for index in order:
                _, value = await self.compute(index, fn, index, value)
            return value
        layers = [await self.model.layer(index) for index in order]
        ready = [max(0.0, self.model.opened_at + (ready_s[index] or 0.0) - self.started) for index in order]

        def chain(value: T) -> tuple[T, list[LayerTiming]]:
            records = []
            for index, layer, ready_at in zip(order, layers, ready, strict=True):
                start = self.now_s()
                value = fn(layer, index, value)
                records.append(LayerTiming(index, layer.name, ready_at, start, self.now_s()))
            return value, records

        value, records = await asyncio.to_thread(chain, value)
        self.records.extend(records)
        return value

    def first_block_done_s(self) -> float | None:
        """When block 0 (layer 1: layer 0 is the embeddings) finished computing."""
        for record in self.records:
            if record.index == 1:
                return record.compute_done_s
        return None
