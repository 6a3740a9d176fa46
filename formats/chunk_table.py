"""The parsed chunk entries held as columns: one numpy array per ChunkEntry field.

A ChunkEntry is made only where one chunk is needed.

A model cut in 256-byte chunks has ~90,000 of them; a frozen dataclass per chunk costs
about 1.5 us to make and keeps the garbage collector walking them for the whole run. The
download path (scheduler, pipeline, session) works on positions into a ``ChunkTable`` and
on slices of its columns; ``entry`` makes the dataclass for one chunk (an integrity error,
a refinement to fold), ``entries`` for all of them (``Manifest.chunks``, made once, on
first use).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .constants import SHA256_SIZE_BYTES


class ChunkTable:
    """Chunks in file order as columns: ``index``, ``layer``, ``offset``, ``size``, ``raw_offset``, ``raw_size``,
    ``pass_index`` (int64, one value per chunk) and ``sha256`` ((n, 32) uint8). Not to be mutated."""

    __slots__ = ("index", "layer", "offset", "size", "raw_offset", "raw_size", "pass_index", "sha256", "_entries")

    def __init__(
        self,
        *,
        index: np.ndarray,
        layer: np.ndarray,
        offset: np.ndarray,
        size: np.ndarray,
        raw_offset: np.ndarray,
        raw_size: np.ndarray,
        sha256: np.ndarray,  # (n, SHA256_SIZE_BYTES) uint8
        pass_index: np.ndarray | None = None,  # None: all BASE_PASS
    ) -> None:
        self.index, self.layer, self.offset, self.size = index, layer, offset, size
        self.raw_offset, self.raw_size, self.sha256 = raw_offset, raw_size, sha256
        self.pass_index = np.zeros(len(index), np.int64) if pass_index is None else pass_index
        self._entries: tuple | None = None

    @classmethod
    def from_entries(cls, entries: Sequence[object]) -> ChunkTable:
        """The columns of ChunkEntry objects (which the table keeps: ``entries`` hands them back)."""
        count = len(entries)

        def column(name: str) -> np.ndarray:
            return np.fromiter((getattr(e, name) for e in entries), np.int64, count)

        shas = b"".join(e.sha256 for e in entries)  # type: ignore[attr-defined]
        table = cls(
            index=column("index"),
            layer=column("layer_index"),
            offset=column("offset"),
            size=column("size_bytes"),
            raw_offset=column("raw_offset"),
            raw_size=column("raw_size_bytes"),
            sha256=np.frombuffer(shas, np.uint8).reshape(count, SHA256_SIZE_BYTES),
            pass_index=column("pass_index"),
        )
        table._entries = tuple(entries)
        return table

    @classmethod
    def empty(cls) -> ChunkTable:
        return cls.from_entries(())

    def __len__(self) -> int:
        return len(self.index)

    _COLUMNS = ("index", "layer", "offset", "size", "raw_offset", "raw_size", "pass_index", "sha256")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkTable):
            return NotImplemented
        return all(np.array_equal(getattr(self, name), getattr(other, name)) for name in self._COLUMNS)

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def __repr__(self) -> str:
        return f"ChunkTable({len(self)} chunks)"

    @property
    def end(self) -> np.ndarray:
        return self.offset + self.size

    def entry(self, position: int):  # -> ChunkEntry (imported late: manifest imports this module)
        """The ChunkEntry at ``position``."""
        if self._entries is not None:
            return self._entries[position]
        from .entries import ChunkEntry

        return ChunkEntry(
            int(self.index[position]),
            int(self.layer[position]),
            int(self.offset[position]),
            int(self.size[position]),
            int(self.raw_offset[position]),
            int(self.raw_size[position]),
            self.sha256[position].tobytes(),
            int(self.pass_index[position]),
        )

    def entries(self) -> tuple:
        """Every chunk as a ChunkEntry, made on the first call (a block at a time: the peak stays near the result's)."""
        if self._entries is None:
            from .entries import ChunkEntry

            made: list[ChunkEntry] = []
            for first in range(0, len(self), _ENTRIES_PER_BLOCK):
                block = slice(first, first + _ENTRIES_PER_BLOCK)
                columns = [c[block].tolist() for c in (self.index, self.layer, self.offset, self.size, self.raw_offset, self.raw_size)]
                shas = [row.tobytes() for row in self.sha256[block]]
                made.extend(map(ChunkEntry, *columns, shas, self.pass_index[block].tolist()))
            self._entries = tuple(made)
        return self._entries

    def take(self, positions: np.ndarray) -> ChunkTable:
        """The chunks at ``positions``, in that order."""
        table = ChunkTable(
            index=self.index[positions],
            layer=self.layer[positions],
            offset=self.offset[positions],
            size=self.size[positions],
            raw_offset=self.raw_offset[positions],
            raw_size=self.raw_size[positions],
            sha256=self.sha256[positions],
            pass_index=self.pass_index[positions],
        )
        if self._entries is not None:
            table._entries = tuple(self._entries[p] for p in np.asarray(positions).tolist())
        return table

    @staticmethod
    def concat(tables: Sequence[ChunkTable]) -> ChunkTable:
        """The chunks of every table, one table after the other."""
        table = ChunkTable(**{name: np.concatenate([getattr(t, name) for t in tables]) for name in ChunkTable._COLUMNS})
        if all(t._entries is not None for t in tables):
            table._entries = tuple(e for t in tables for e in t._entries)  # type: ignore[union-attr]
        return table


_ENTRIES_PER_BLOCK = 4096


def column_at(values: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """``values[positions]``: a view for a run (a range), else a copy."""
    if isinstance(positions, range) and positions.step == 1:
        return values[positions.start : positions.stop]
    return values[np.asarray(positions, np.int64)]


class EntriesAt(Sequence):
    """The ChunkEntry of each of ``positions`` in ``table``, made when indexed (to name a chunk in an error)."""

    def __init__(self, table: ChunkTable, positions: Sequence[int]) -> None:
        self.table, self.positions = table, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, item):  # type: ignore[override]
        if isinstance(item, slice):
            return [self.table.entry(p) for p in self.positions[item]]
        return self.table.entry(self.positions[item])
