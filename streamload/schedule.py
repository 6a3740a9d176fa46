"""Which chunks to fetch next: file (= execution) order, with requested layers moved to the front."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .formats import ChunkEntry


class ChunkScheduler:
    """Pending chunks, handed out as spans of contiguous chunks for one ranged request each.

    A chunk is pending, taken (its bytes are on the way or being verified), or
    done. A taken chunk that fails comes back as pending; ``finished`` means
    nothing is pending or taken.
    """

    def __init__(self, chunks: Iterable[ChunkEntry]) -> None:
        self._pending: dict[int, ChunkEntry] = {c.index: c for c in chunks}  # insertion = file order
        self._taken: set[int] = set()
        self._urgent_layers: list[int] = []  # in the order they were asked for
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return not self._pending and not self._taken

    @property
    def pending_bytes(self) -> int:
        return sum(c.size_bytes for c in self._pending.values())

    def prioritize(self, layer_index: int) -> None:
        """Fetch this layer's pending chunks before any other not yet taken."""
        if layer_index not in self._urgent_layers and any(c.layer_index == layer_index for c in self._pending.values()):
            self._urgent_layers.append(layer_index)
            self._changed.set()

    def urgent_waiting(self) -> bool:
        """True when a layer someone asked for has chunks nobody has taken yet."""
        return any(c.layer_index in self._urgent_layers for c in self._pending.values())

    def _first(self) -> ChunkEntry | None:
        for layer in list(self._urgent_layers):
            for chunk in self._pending.values():
                if chunk.layer_index == layer:
                    return chunk
            self._urgent_layers.remove(layer)
        return next(iter(self._pending.values()), None)

    def take_span(self, max_bytes: int) -> list[ChunkEntry]:
        """The highest-priority pending chunk plus the pending chunks right after it in the file, up to max_bytes."""
        first = self._first()
        if first is None:
            return []
        span = [first]
        size = first.size_bytes
        candidate = self._pending.get(first.index + 1)
        while candidate is not None and candidate.offset == span[-1].end and size + candidate.size_bytes <= max_bytes:
            span.append(candidate)
            size += candidate.size_bytes
            candidate = self._pending.get(candidate.index + 1)
        for chunk in span:
            del self._pending[chunk.index]
            self._taken.add(chunk.index)
        return span

    def take_all(self) -> list[ChunkEntry]:
        """Every pending chunk, in file order (for a server that can only send the whole file)."""
        chunks = sorted(self._pending.values(), key=lambda c: c.index)
        self._pending.clear()
        self._taken.update(c.index for c in chunks)
        return chunks

    def done(self, chunk: ChunkEntry) -> None:
        self._taken.discard(chunk.index)
        self._changed.set()

    def give_back(self, chunks: Iterable[ChunkEntry]) -> None:
        """Chunks whose bytes did not arrive or failed verification: pending again, in file order."""
        returned = {c.index: c for c in chunks if c.index in self._taken}
        if not returned:
            return
        for index in returned:
            self._taken.discard(index)
        merged = {**self._pending, **returned}
        self._pending = dict(sorted(merged.items()))
        self._changed.set()

    async def wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()
