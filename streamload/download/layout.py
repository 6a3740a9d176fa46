"""Where one model's chunks lie in the file, by position (file order): offsets, sizes, holes, chunk index -> position.

The scheduler's read-only view of its ``ChunkTable``: built once (O(chunks), a copy of two columns and their prefix
sums), then lookups in O(1) or O(log chunks). Never changed after it is built, so any thread may read it.
"""

from __future__ import annotations

import array
import bisect
import dataclasses
from collections.abc import Iterable

import numpy as np

from ..formats.chunk_table import ChunkTable


def _int_array(values: np.ndarray) -> array.array[int]:
    copy = array.array("q")
    copy.frombytes(values.astype(np.int64, copy=False).tobytes())
    return copy


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkLayout:
    """A chunk table's file geometry; plain int64 arrays (array.array): read an element at a time, and bisect-able."""

    offsets: array.array[int]  # per position: data offset, ascending (file order)
    sizes: array.array[int]  # per position: compressed size
    bytes_before: array.array[int]  # compressed bytes before each position, and in all (a run's size is a difference)
    holes: list[int]  # positions not back to back with the chunk before them in the file, ascending
    position_of: np.ndarray  # chunk index -> position (-1: not in the table)

    @classmethod
    def of(cls, table: ChunkTable) -> ChunkLayout:
        count = len(table)
        position_of = np.full(int(table.index.max()) + 1 if count else 0, -1, np.int64)
        position_of[table.index] = np.arange(count)
        bytes_before = np.concatenate([[0], np.cumsum(table.size)])
        shift = table.offset - bytes_before[:-1]  # changes at a hole
        return cls(
            offsets=_int_array(table.offset),
            sizes=_int_array(table.size),
            bytes_before=_int_array(bytes_before),
            holes=(np.flatnonzero(np.diff(shift)) + 1).tolist(),
            position_of=position_of,
        )

    def positions(self, indices: Iterable[int]) -> np.ndarray:
        """The positions of those chunk indices that the table holds (the others are left out)."""
        wanted = np.fromiter(indices, np.int64)
        found = self.position_of[wanted[(wanted >= 0) & (wanted < len(self.position_of))]]
        return found[found >= 0]

    def position_at(self, offset: int) -> int:
        """The first position whose chunk starts at or after data offset ``offset`` (the count when none does)."""
        return bisect.bisect_left(self.offsets, offset)

    def run_limit(self, position: int, end: int, room_bytes: int) -> int:
        """``end``, or sooner the next hole after ``position``, or the end of the chunks from ``position`` that fit
        in ``room_bytes`` (``position`` itself when the first does not)."""
        hole = bisect.bisect_left(self.holes, position)  # a hole at ``position`` itself: the gap rule decides
        if hole < len(self.holes):
            end = min(end, self.holes[hole])
        fits = bisect.bisect_right(self.bytes_before, self.bytes_before[position] + room_bytes) - 1
        return max(position, min(end, fits))
