"""A span: chunks back to back in the file, fetched with one request and received by pool threads in turn.

The scheduler hands spans out and cuts them (``cut``: end at the next chunk boundary); the pipeline's threads
receive them chunk by chunk (``received``) under ``lock``; the first failure is the span's outcome (``error``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from ..formats.chunk_table import ChunkTable, column_at


@dataclasses.dataclass(eq=False)
class Span:
    """Contiguous chunks fetched with one request and received by pool threads in turn: ``positions`` (ascending) in
    the scheduler's ``table``."""

    table: ChunkTable
    positions: Sequence[int]  # a range for a run of back-to-back chunks (the common case)
    cuttable: bool = True
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    received: int = 0  # positions[:received] came off the connection
    cut: bool = False  # end at the next chunk boundary (set by the scheduler)
    error: BaseException | None = None  # the first failure: the span's outcome
    unreported_wait_s: float = 0.0  # receives that brought no whole chunk (under ``lock``): the pipeline reports them at the end
    abort: object = None  # called with no argument to make a blocked reader fail (set by whoever reads the span)

    @property
    def start(self) -> int:
        """Data offset of the first chunk."""
        return int(self.table.offset[self.positions[0]])

    @property
    def end(self) -> int:
        """Data offset just past the last chunk."""
        last = self.positions[-1]
        return int(self.table.offset[last] + self.table.size[last])

    def received_bytes(self) -> int:
        """Compressed bytes of the chunks that came off the connection."""
        return int(column_at(self.table.size, self.positions[: self.received]).sum())

    def stop(self, error: BaseException | None = None) -> None:
        """End the span at the next chunk boundary; with an error, also abort its connection (any thread)."""
        self.cut = True
        if error is not None and self.error is None:
            self.error = error
            if callable(self.abort):
                self.abort()
