"""The scheduler's demands: positions someone waits for (a layer, rows, chunks given back), oldest first.

Each demand keeps a cursor past its positions that no longer qualify, so finding the first one that does costs
O(1) amortized per position over the demand's life. Event loop only, like the ``ChunkScheduler`` that owns it.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


class _Demand:
    """Positions someone waits for, in file order, with a cursor past those no longer pending."""

    __slots__ = ("positions", "cursor", "jump")

    def __init__(self, positions: Sequence[int], jump: bool = True) -> None:
        self.positions = positions
        self.cursor = 0
        self.jump = jump  # a queue jump (cuts running spans), not rows fetched beside them


class DemandQueue:
    """Demands in the order they came, but for chunks given back, which go first."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        self._queue: collections.deque[_Demand] = collections.deque()

    def add(self, positions: Sequence[int], *, jump: bool) -> None:
        """A new demand (positions ascending), after the others."""
        self._queue.append(_Demand(positions, jump=jump))

    def add_first(self, positions: Sequence[int], *, jump: bool) -> None:
        """A demand ahead of the others (demanded chunks given back)."""
        self._queue.appendleft(_Demand(positions, jump=jump))

    def first_in_state(self, state: bytearray, code: int) -> int | None:
        """The oldest demand's first position whose byte in ``state`` is ``code``; demands with none left are dropped."""
        queue = self._queue
        while queue:
            demand = queue[0]
            while demand.cursor < len(demand.positions) and state[demand.positions[demand.cursor]] != code:
                demand.cursor += 1
            if demand.cursor < len(demand.positions):
                return demand.positions[demand.cursor]
            queue.popleft()
        return None

    def leads_with_jump(self) -> bool:
        """The oldest demand is a queue jump (a layer awaited), not rows."""
        return bool(self._queue) and self._queue[0].jump
