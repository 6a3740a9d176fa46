"""Which chunks to fetch next: file (= execution) order, with demanded chunks first; the only place spans are cut.

Every chunk is pending, taken (its bytes are on the way or being verified) or
done. ``take_span`` hands out the highest-priority pending chunk plus the
pending chunks after it in the file, for one request. A demand (a layer
someone awaits) moves its chunks ahead of the rest; when a demand has pending
chunks that no running span will reach, the running spans are cut: each ends at
its next chunk boundary and gives back what it did not receive. A row demand
(the rows of a row table an input needs) does not cut: extra requests fetch it
beside the running ones (``take_urgent_span``). A span over a whole-file body (a
server that ignores Range) is never cut: a new request would start again from byte 0.

A refinement chunk (a progressive tensor's correction, folded into the coarse
levels already stored) ``requires`` the pass-0 chunks under it: it is handed
out only once they are done, so a span stops before one whose base is not.

Spans in file order stop where the row tables begin (``rows_from``), so the
execution steps are never queued behind a table; spans may skip over chunks
that are done or taken when the gap is at most ``max_gap_bytes`` (the reader
drops those bytes): one request instead of a round trip per piece.

Costs: every operation is O(1) amortized per chunk (cursors only move forward,
except over chunks given back); a demand costs O(its chunks) once. All methods
run on the event loop, except that pool threads read ``Span.cut``. Where the chunks lie: ``layout.py``; the
demands' queue: ``demands.py``.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Iterable, Mapping, Sequence, Set

import numpy as np

from ..formats import ChunkEntry
from ..formats.chunk_table import ChunkTable
from .demands import DemandQueue
from .layout import ChunkLayout
from .span import Span

PENDING, TAKEN, DONE = 0, 1, 2
JUMP, ROWS = 1, 2  # why a position is urgent: a layer awaited out of order (cuts spans), or rows (fetched beside them)
PENDING_BYTE, TAKEN_BYTE, DONE_BYTE = bytes([PENDING]), bytes([TAKEN]), bytes([DONE])  # for bytearray.find
JUMP_BYTE, ROWS_BYTE = bytes([JUMP]), bytes([ROWS])


class ChunkScheduler:
    """Pending chunks of one model, handed out as spans of contiguous chunks."""

    def __init__(
        self,
        chunks: ChunkTable | Sequence[ChunkEntry],
        done_indices: Iterable[int] = (),
        *,
        rows_from: int | None = None,
        requires: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        table = chunks if isinstance(chunks, ChunkTable) else ChunkTable.from_entries(chunks)
        self.table = table  # the manifest's chunks in file order; a position is an index into it
        count = len(table)
        self._rows_from = count if rows_from is None else rows_from  # first position of the row tables
        self._layout = layout = ChunkLayout.of(table)
        # the layout's columns, read an element at a time in the walks below
        self._offsets, self._sizes, self._bytes_before = layout.offsets, layout.sizes, layout.bytes_before
        done = np.zeros(count, bool)
        done[layout.positions(done_indices)] = True
        self._state = bytearray((done * DONE).astype(np.uint8).tobytes())
        # position -> positions that must be done before it is handed out (a refinement's pass-0 chunks)
        self._requires = {self._position(i): [self._position(b) for b in base] for i, base in (requires or {}).items()}
        self._refinement_positions = sorted(self._requires)  # for the runs: where a blocked refinement may end one
        self._layers = table.layer
        self._layer_positions: dict[int, list[int]] = {}  # made on a layer's first demand
        self._pending = self._state.count(PENDING)
        self._pending_bytes = int(table.size[~done].sum())
        self._taken = 0
        self._cursor = 0  # no pending chunk before it
        self._urgent = bytearray(len(chunks))  # why a demand wants this position: JUMP or ROWS (0: none)
        self._urgent_pending = 0  # pending positions that a demand wants
        self._demands = DemandQueue()
        self._running: set[Span] = set()
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ state

    @property
    def finished(self) -> bool:
        return self._pending == 0 and self._taken == 0

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _blocked(self, position: int) -> bool:
        """A refinement whose pass-0 chunks are not all done yet."""
        base = self._requires.get(position)
        return base is not None and any(self._state[p] != DONE for p in base)

    def _position(self, index: int) -> int:
        return int(self._layout.position_of[index])

    def position_of(self, chunk: ChunkEntry) -> int:
        return self._position(chunk.index)

    def done_mask(self) -> np.ndarray:
        """Per position: verified and stored."""
        return np.frombuffer(self._state, np.uint8) == DONE

    def first_not_done(self) -> int | None:
        """The first position that is pending or taken."""
        found = [p for p in (self._state.find(PENDING_BYTE), self._state.find(TAKEN_BYTE)) if p >= 0]
        return min(found, default=None)

    def urgent_waiting(self) -> bool:
        """True when a chunk someone waits for is pending (nobody is fetching it)."""
        return self._urgent_pending > 0

    # ------------------------------------------------------------ demand

    def prioritize(self, layer_index: int, *, coarse: bool = False) -> None:
        """Fetch this layer's pending chunks (``coarse``: its pass-0 chunks only, not its refinements) before any other
        not yet taken; cut running spans that would not reach them."""
        positions = self._layer_positions.get(layer_index)
        if positions is None:
            positions = self._layer_positions[layer_index] = np.flatnonzero(self._layers == layer_index).tolist()
        if coarse and self._requires:
            positions = [p for p in positions if p not in self._requires]
        self.demand(positions)

    def demand(self, positions: Sequence[int], *, cut: bool = True) -> None:
        """Fetch these positions (ascending) first; ``cut=False``: without cutting running spans (extra requests fetch them)."""
        added = False
        for position in positions:
            if not self._urgent[position]:
                self._urgent[position] = JUMP if cut else ROWS
                if self._state[position] == PENDING:
                    self._urgent_pending += 1
                    added = True
        if added:
            self._demands.add(positions, jump=cut)
            self._changed.set()
            if cut:
                self._cut_running()
        if not cut:
            self._cut_holders(positions)

    def _cut_holders(self, positions: Sequence[int]) -> None:
        """Cut running spans that hold some of these positions beyond the chunk they are receiving: what they give
        back is then pending, for extra requests to fetch at once (their in-order walk leaves it to them)."""
        wanted = set(positions)
        for span in self._running:
            if span.cuttable and not span.cut:
                if not wanted.isdisjoint(span.positions[span.received + 1 :]):
                    span.cut = True

    def _cut_running(self) -> None:
        if self._urgent_pending:
            for span in self._running:
                if span.cuttable:
                    span.cut = True

    # ------------------------------------------------------------ handing out

    def _first(self) -> int | None:
        """The position of the highest-priority pending chunk."""
        if self._urgent_pending:
            first = self._demands.first_in_state(self._state, PENDING)
            if first is not None:
                return first
        found = self._state.find(PENDING_BYTE, self._cursor)
        self._cursor = len(self._state) if found < 0 else found
        return None if found < 0 else found

    def _take(self, position: int) -> int:
        self._state[position] = TAKEN
        self._pending -= 1
        self._taken += 1
        self._pending_bytes -= self._sizes[position]
        if self._urgent[position]:
            self._urgent_pending -= 1
        return position

    def take_span(self, max_bytes: int, max_gap_bytes: int = 0, avoid: Set[int] = frozenset()) -> Span | None:
        """The highest-priority pending chunk and pending chunks after it in the file, up to max_bytes in all.

        After a demanded chunk the span reaches on only to further demanded chunks (with
        whatever pending chunks lie between them); otherwise it takes every pending chunk, but
        stops where the row tables begin unless it started among them. It skips over chunks that
        are not pending when the gap is at most ``max_gap_bytes``. Positions in ``avoid`` (chunks
        this source served corrupt) are left for others: treated as not pending.
        """
        first = self._first()
        if first is not None and (first in avoid or self._blocked(first)):
            first = next(
                (p for p in range(self._cursor, len(self._state)) if self._state[p] == PENDING and p not in avoid and not self._blocked(p)),
                None,
            )
        if first is None:
            return None
        return self._span_from(first, max_bytes, max_gap_bytes, by_demand=bool(self._urgent[first]), avoid=avoid)

    def take_span_at(
        self, offset: int, max_bytes: int, max_gap_bytes: int, max_skip_bytes: int, avoid: Set[int] = frozenset()
    ) -> Span | None:
        """The span an open body at data offset ``offset`` goes on with: from the first chunk at or after it, if that
        one is pending and at most ``max_skip_bytes`` ahead, every pending chunk in file order, demanded or not
        (they arrive in order on the open connection); None otherwise (the body is of no further use)."""
        position = self._layout.position_at(offset)
        if (
            position >= len(self._state)
            or self._state[position] != PENDING
            or position in avoid
            or self._offsets[position] - offset > max_skip_bytes
            or self._blocked(position)
        ):
            return None
        first = self._first()
        if first is not None and self._urgent[first] and self._demands.leads_with_jump():
            if self._offsets[first] - offset > max_skip_bytes:
                return None  # a layer far ahead is awaited: it jumps the queue on a new request
        return self._span_from(position, max_bytes, max_gap_bytes, by_demand=False, avoid=avoid)

    def take_urgent_span(self, max_bytes: int, max_gap_bytes: int, avoid: Set[int] = frozenset()) -> Span | None:
        """Like take_span, but only for a demanded chunk (None when no demand is pending): extra requests for rows."""
        if not self._urgent_pending:
            return None
        first = self._first()
        if first is None or not self._urgent[first] or first in avoid or self._blocked(first):
            return None
        return self._span_from(first, max_bytes, max_gap_bytes, by_demand=True, avoid=avoid)

    def _span_from(self, first: int, max_bytes: int, max_gap_bytes: int, *, by_demand: bool, avoid: Set[int] = frozenset()) -> Span:
        state, offsets, sizes, urgent, requires = self._state, self._offsets, self._sizes, self._urgent, self._requires
        taken = [first]
        size = sizes[first]
        previous_end = offsets[first] + sizes[first]  # of the last chunk taken
        position = first + 1
        if by_demand:  # on to the next demanded chunk within the gap; pending ones between ride along
            riders: list[int] = []
            riders_size = 0
            while position < len(state):
                if offsets[position] - previous_end > max_gap_bytes:
                    break
                if state[position] == PENDING and position not in avoid:
                    if requires and self._blocked(position):
                        break
                    if urgent[position]:
                        if size + riders_size + sizes[position] > max_bytes:
                            break
                        taken += riders
                        taken.append(position)
                        size += riders_size + sizes[position]
                        previous_end = offsets[position] + sizes[position]
                        riders, riders_size = [], 0
                    else:
                        riders.append(position)
                        riders_size += sizes[position]
                position += 1
        else:  # every pending chunk in file order, over holes within the gap, up to the row tables
            limit = len(state) if first >= self._rows_from else self._rows_from
            while position < limit:
                if not avoid and position == taken[-1] + 1:  # pending chunks back to back, none demanded: all at once
                    run_end = self._run_end(position, limit, max_bytes - size)
                    if run_end > position:
                        taken.extend(range(position, run_end))
                        size += self._bytes_before[run_end] - self._bytes_before[position]
                        previous_end = offsets[run_end - 1] + sizes[run_end - 1]
                        position = run_end
                        continue
                if state[position] == PENDING and urgent[position] != ROWS and position not in avoid:  # rows: left to extra requests
                    if offsets[position] - previous_end > max_gap_bytes or size + sizes[position] > max_bytes:
                        break
                    if requires and self._blocked(position):
                        break
                    taken.append(position)
                    size += sizes[position]
                    previous_end = offsets[position] + sizes[position]
                elif offsets[position] + sizes[position] - previous_end > max_gap_bytes:
                    break
                position += 1
        if taken[-1] - taken[0] + 1 == len(taken):  # one run: taken with slices
            span = Span(self.table, self._take_run(taken[0], taken[-1] + 1))
        else:
            span = Span(self.table, [self._take(p) for p in taken])
        self._running.add(span)
        return span

    def _run_end(self, position: int, limit: int, room_bytes: int) -> int:
        """The end of the run of chunks from ``position`` that are pending, not demanded, back to back in the file and
        fit in ``room_bytes`` (``position`` itself when the first does not)."""
        state, urgent = self._state, self._urgent
        end = limit
        for flag in (TAKEN_BYTE, DONE_BYTE):
            found = state.find(flag, position, end)
            end = end if found < 0 else found
        for flag in (JUMP_BYTE, ROWS_BYTE):
            found = urgent.find(flag, position, end)
            end = end if found < 0 else found
        if self._refinement_positions:  # a refinement whose coarse chunks are not done ends the run
            refinements = self._refinement_positions
            for index in range(bisect.bisect_left(refinements, position), bisect.bisect_left(refinements, end)):
                if self._blocked(refinements[index]):
                    end = refinements[index]
                    break
        return self._layout.run_limit(position, end, room_bytes)  # a run stops at a hole, and where room runs out

    def _take_run(self, start: int, end: int) -> range:
        """``_take`` for every position of [start, end), all pending."""
        self._state[start:end] = TAKEN_BYTE * (end - start)
        self._pending -= end - start
        self._taken += end - start
        self._pending_bytes -= self._bytes_before[end] - self._bytes_before[start]
        self._urgent_pending -= end - start - self._urgent.count(0, start, end)
        return range(start, end)

    def take_positions(self, positions: Iterable[int]) -> list[int]:
        """Take these positions (those pending) for a fetcher outside the spans (a delta file: ``download/delta_stream.py``); it reports
        them with ``done`` and ``give_back`` as a span's reader does."""
        return [self._take(p) for p in positions if self._state[p] == PENDING]

    def take_all(self) -> Span | None:
        """Every pending chunk in file order, as one span that cannot be cut (a server that sends only the whole file)."""
        positions = [self._take(p) for p in range(len(self._state)) if self._state[p] == PENDING]
        if not positions:
            return None
        span = Span(self.table, positions, cuttable=False)
        self._running.add(span)
        return span

    # ------------------------------------------------------------ outcomes

    def done(self, positions: Iterable[int]) -> None:
        """Chunks (positions) verified and stored."""
        state = self._state
        run = isinstance(positions, range) and positions.step == 1
        if run and state.count(TAKEN_BYTE, positions.start, positions.stop) == len(positions):  # type: ignore[union-attr]
            state[positions.start : positions.stop] = DONE_BYTE * len(positions)  # type: ignore[union-attr]
            finished = len(positions)
        else:
            finished = 0
            for position in positions:
                if state[position] == TAKEN:
                    state[position] = DONE
                    finished += 1
        if finished:
            self._taken -= finished
            self._changed.set()

    def give_back(self, positions: Iterable[int]) -> None:
        """Chunks (positions) whose bytes did not arrive or failed verification: pending again."""
        returned = False
        urgent: list[int] = []
        for position in positions:
            if self._state[position] != TAKEN:
                continue
            self._state[position] = PENDING
            self._taken -= 1
            self._pending += 1
            self._pending_bytes += self._sizes[position]
            self._cursor = min(self._cursor, position)
            if self._urgent[position]:
                self._urgent_pending += 1
                urgent.append(position)
            returned = True
        if urgent:
            self._demands.add_first(sorted(urgent), jump=False)
        if returned:
            self._changed.set()
            self._cut_running()

    def reopen(self, positions: Iterable[int]) -> None:
        """Done chunks (positions) whose stored bytes turned out damaged: pending again, ahead of the rest."""
        reopened = []
        for position in positions:
            if self._state[position] != DONE:
                continue
            self._state[position] = PENDING
            self._pending += 1
            self._pending_bytes += self._sizes[position]
            self._cursor = min(self._cursor, position)
            reopened.append(position)
        if reopened:
            self._changed.set()
            self.demand(sorted(reopened))

    def finish_span(self, span: Span) -> Sequence[int]:
        """A span's request ended: give back what it did not receive; returns those positions."""
        self._running.discard(span)
        missed = span.positions[span.received :]
        self.give_back(missed)
        return missed

    def notify(self) -> None:
        """Wake the workers waiting for a change: something outside the chunks changed (a source came or went)."""
        self._changed.set()

    async def wait_for_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()
