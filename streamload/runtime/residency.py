"""A decoder's weights under a memory budget: resident copies, and segments read from the store on every step.

``DecodeWeights`` hands the decode loop each block's ``Layer`` and the head's matrix, a segment at a time, in the
order a step uses them. Resident segments are copies in anonymous memory (a cgroup cannot evict them, and nothing
else is kept in the page cache to compete with them). Streamed segments are read by ``SegmentReader``'s one thread
into two reused page-aligned buffers: while the loop computes on one, the next is read into the other, and the reads
run ahead across the token boundary (a step's reads do not depend on the token). Reads bypass the page cache
(O_DIRECT) where the filesystem allows it, so they neither evict the resident weights nor count against the budget;
elsewhere they are buffered and the pages dropped behind them (POSIX_FADV_DONTNEED).

Threads: the reader thread (``os.preadv`` releases the GIL, so it overlaps with numpy's casts and BLAS); the loop's
thread, which waits only for a segment not read yet. Costs: two buffers of the largest segment, the resident copies,
and per step the streamed bytes at the disk's rate (``ResidencyPlan.streamed_bytes_per_step``).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import CacheError
from ..formats import Manifest
from ..layer import Layer, map_layer
from .memory import PAGE_BYTES, ResidencyPlan, Segment

logger = logging.getLogger(__name__)

MAP_FIXED = 0x10  # Linux's mmap flag (the mmap module does not export it)
READ_PIECE_BYTES = 8 << 20  # a read waits for this much of the ring to be free, not a whole segment
DIRECT_READS = True  # O_DIRECT where the filesystem takes it (False: buffered reads, their pages dropped behind them)
HEAD_ROWS_ALIGNMENT = 1024  # head segments start on multiples of this many rows: whole 4 MiB cast tiles at width <= 1024


class SegmentReader:
    """Reads the plan's streamed segments in a cycle, one after another, into one ring buffer, on one thread.

    The k-th read (k = 0, 1, ...) is segment ``order[k % len(order)]``; ``take(k)`` waits until it is read and returns its
    bytes as one contiguous view; ``give_back(k)`` (in order) frees them. The reader runs ahead into whatever the ring
    has free: with ``memory.LOOKAHEAD_BYTES`` beyond the largest segment it keeps reading while the loop computes on a
    segment (a block computes in less time than this many bytes take to read), so the disk never waits for it. The
    ring is mapped twice, back to back, so a segment that wraps past its end is still one view; where that mapping
    cannot be made, a segment that would wrap starts again at the ring's start (less of the next read then overlaps
    the current compute).
    """

    def __init__(self, path: Path, segments: tuple[Segment, ...], order: tuple[int, ...], ring: Ring) -> None:
        self.segments = segments
        self.order = order
        self.ring = ring
        self._placed: dict[int, tuple[int, int, int]] = {}  # read number -> (start in the byte stream, length, store offset)
        self._produced = 0  # bytes of the stream written (or skipped)
        self._released = 0  # bytes of the stream given back: the reader may write up to released + capacity
        self._failure: BaseException | None = None
        self._closed = False
        self._condition = threading.Condition()
        self.path = path
        self._fd, self.direct = _open_for_streaming(path)
        self._thread = threading.Thread(target=self._read_all, name="streamload-weights", daemon=True)
        self._thread.start()

    def take(self, number: int) -> tuple[memoryview, int]:
        """The bytes of read ``number`` and the store offset of the first, once it is read."""
        with self._condition:
            while number not in self._placed:
                if self._failure is not None:
                    raise CacheError(f"reading the model's weights from its store failed: {self._failure}") from self._failure
                self._condition.wait()
            start, length, base = self._placed[number]
        position = start % self.ring.capacity
        return self.ring.view[position : position + length], base

    def give_back(self, number: int) -> None:
        with self._condition:
            start, length, _ = self._placed.pop(number)
            self._released = start + length
            self._condition.notify_all()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join()
        os.close(self._fd)

    def _read_all(self) -> None:
        number = 0
        try:
            while not self._closed:
                segment = self.segments[self.order[number % len(self.order)]]
                base, length = self._extent(segment)
                start = self._produced
                if not self.ring.mirrored and start % self.ring.capacity + length > self.ring.capacity:
                    start = _round_up(start, self.ring.capacity)  # no wrapping: to the ring's start
                if not self._read(segment, start, base, length):
                    return
                with self._condition:
                    self._placed[number] = (start, length, base)
                    self._produced = start + length
                    self._condition.notify_all()
                number += 1
        except BaseException as exc:  # handed to the loop's thread, which raises it
            with self._condition:
                self._failure = exc
                self._condition.notify_all()

    def _extent(self, segment: Segment) -> tuple[int, int]:
        """(store offset of the first byte read, bytes read) for ``segment``: whole pages for a direct read."""
        if not self.direct:
            return segment.offset, _round_up(segment.size_bytes, PAGE_BYTES)
        return _pages_of(segment)

    def _read(self, segment: Segment, start: int, base: int, length: int) -> bool:
        """Read ``segment`` to stream position ``start``, a piece at a time as the ring frees; False once closed."""
        needed = segment.offset + segment.size_bytes - base
        done = 0
        while done < needed:
            piece = min(READ_PIECE_BYTES, length - done)
            with self._condition:  # the bytes this piece overwrites (a lap back; at most what was read) must be given back
                while min(start + done + piece - self.ring.capacity, self._produced) > self._released and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return False
            position = (start + done) % self.ring.capacity
            want = min(piece, needed - done)
            view = self.ring.view[position : position + (piece if self.direct else want)]
            try:
                got = os.preadv(self._fd, [view], base + done)
            except OSError as exc:
                if not self.direct:
                    raise
                logger.info("direct reads of the store failed (%s); reading through the page cache", exc)  # took O_DIRECT at open only
                os.close(self._fd)
                self._fd, self.direct = _open_for_streaming(self.path, direct=False)
                continue
            if got <= 0:
                raise OSError(f"the store ended at byte {base + done}, before {base + needed}")
            done += min(got, want)
        if not self.direct:
            _drop_behind(self._fd, segment.offset, segment.size_bytes)
        return True


class Ring:
    """``capacity`` bytes of anonymous memory, page-aligned, mapped twice back to back where the system allows (then
    ``view`` is 2 x capacity long and byte i + capacity is byte i); unmapped when the last view of it is gone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = _round_up(capacity, PAGE_BYTES)
        mirrored = _map_mirrored(self.capacity)
        if mirrored is None:
            self._memory: object = mmap.mmap(-1, self.capacity)
            self.view = memoryview(self._memory)  # type: ignore[arg-type]
            self.mirrored = False
        else:
            self._memory = mirrored
            self.view = memoryview(mirrored).cast("B")
            self.mirrored = True


def _map_mirrored(capacity: int) -> object | None:
    """A ctypes array over 2 x ``capacity`` bytes whose halves are one memfd mapped twice, or None (not Linux, refused)."""
    if not hasattr(os, "memfd_create") or sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        fd = os.memfd_create("streamload-weights", os.MFD_CLOEXEC)
    except (OSError, AttributeError):
        return None
    try:
        os.ftruncate(fd, capacity)
        failed = ctypes.c_void_p(-1).value
        reserved = libc.mmap(None, 2 * capacity, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)  # PROT_NONE: the address range
        if reserved in (None, failed):
            return None
        for half in (0, 1):
            placed = libc.mmap(reserved + half * capacity, capacity, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | MAP_FIXED, fd, 0)
            if placed != reserved + half * capacity:
                libc.munmap(reserved, 2 * capacity)
                return None
    finally:
        os.close(fd)  # the mappings keep the memory
    array = (ctypes.c_char * (2 * capacity)).from_address(reserved)
    weakref.finalize(array, libc.munmap, reserved, 2 * capacity)  # when no view of it is left
    return array


def _open_for_streaming(path: Path, *, direct: bool = True) -> tuple[int, bool]:
    """The store opened for direct reads where the filesystem allows them (and ``direct``), else buffered: (fd, direct)."""
    if direct and DIRECT_READS and hasattr(os, "O_DIRECT"):
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC), True
        except OSError:
            pass
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
    except OSError as exc:
        raise CacheError(f"opening the model's store {path} failed: {exc.strerror or exc}") from None


def _drop_behind(fd: int, offset: int, size_bytes: int) -> None:
    """A buffered read's pages leave the page cache at once: they would evict what stays resident."""
    try:
        os.posix_fadvise(fd, offset, size_bytes, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def _read_fully(fd: int, view: memoryview, offset: int, needed: int) -> None:
    """preadv until ``needed`` bytes are in ``view`` (a direct read may ask past the end of the file: that part stays)."""
    done = 0
    while done < needed:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"the store ended at byte {offset + done}, before {offset + needed}")
        done += got


def _pages_of(segment: Segment) -> tuple[int, int]:
    """(store offset, bytes) of the whole pages holding ``segment``: what a direct read reads."""
    base = segment.offset - segment.offset % PAGE_BYTES
    return base, _round_up(segment.offset + segment.size_bytes - base, PAGE_BYTES)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def read_resident(path: Path, segment: Segment) -> tuple[mmap.mmap, int]:
    """A resident copy of ``segment`` in anonymous memory, and the store offset of its first byte."""
    fd, direct = _open_for_streaming(path)
    try:
        base, length = _pages_of(segment)
        copy = mmap.mmap(-1, length)
        try:
            _read_fully(fd, memoryview(copy), base, segment.offset + segment.size_bytes - base)
        except OSError:
            if not direct:
                raise
            os.close(fd)
            fd, direct = _open_for_streaming(path, direct=False)
            _read_fully(fd, memoryview(copy), base, segment.offset + segment.size_bytes - base)
        if not direct:
            _drop_behind(fd, base, segment.offset + segment.size_bytes - base)
        return copy, base
    except OSError as exc:
        raise CacheError(f"reading the model's weights from its store {path} failed: {exc}") from None
    finally:
        os.close(fd)


class DecodeWeights:
    """The blocks and head matrix of one decode: ``block(i)`` / ``done(i)`` per block in order, then ``head_logits``
    over the head's row segments (the loop always asks in the plan's order: blocks 0..n-1, then the head's rows).

    Without a plan, or with one that keeps everything resident, the weights are the memory-mapped layers the prefill
    used (``mapped_blocks``, ``mapped_head``): no copies and no reads. Otherwise resident segments are copies and the
    rest streams through a ``SegmentReader``. The head is computed per row segment either way, so a budget changes
    where the bytes come from, never the floats.
    """

    def __init__(
        self,
        manifest: Manifest,
        store_path: Path,
        segments: list[Segment],
        plan: ResidencyPlan | None,
        *,
        head_matrix: str,
        mapped_blocks: list[Layer],
        mapped_head: np.ndarray,
    ) -> None:
        self.manifest = manifest
        self.segments = tuple(segments)
        self.plan = plan
        self.head_matrix = manifest.tensor(head_matrix)
        self.mapped = self.reads_mapped(plan)
        self._mapped_blocks = mapped_blocks
        self._mapped_head = mapped_head
        resident = () if self.mapped or plan is None else sorted(plan.resident)
        self._resident: dict[int, tuple[mmap.mmap, int]] = {i: read_resident(store_path, self.segments[i]) for i in resident}
        self._layers: dict[int, Layer] = {}  # resident blocks, mapped once
        self._streamed = () if self.mapped or plan is None else plan.streamed
        self._reader = None
        if self._streamed and plan is not None:
            self._reader = SegmentReader(store_path, self.segments, self._streamed, Ring(plan.ring_bytes))
        self._reads = 0  # reads taken so far: read k is of streamed[k % len(streamed)]
        self._taken: int | None = None
        self._block_segment = {s.block: i for i, s in enumerate(self.segments) if s.block is not None}

    @staticmethod
    def reads_mapped(plan: ResidencyPlan | None) -> bool:
        """Whether decode under ``plan`` reads the prefill's memory-mapped layers (no plan, or one keeping all resident)."""
        return plan is None or plan.all_resident

    def block(self, index: int) -> Layer:
        """Block ``index``'s layer (layer ``index + 1``): mapped, resident, or just read."""
        if self.mapped:
            return self._mapped_blocks[index]
        segment = self._block_segment[index]
        if segment in self._resident:
            if segment not in self._layers:
                copy, base = self._resident[segment]
                self._layers[segment] = map_layer(self.manifest, copy, index + 1, base_offset=base)
            return self._layers[segment]
        view, base = self._take(segment)
        return map_layer(self.manifest, view, index + 1, base_offset=base)

    def done(self, index: int) -> None:
        """The loop is finished with block ``index``: a streamed block's buffer goes back to the reader."""
        if not self.mapped:
            self._give_back(self._block_segment[index])

    def head_logits(self, project: Callable[[np.ndarray, slice], np.ndarray]) -> np.ndarray:
        """The head's output, ``project(rows of the matrix, their row slice)`` per row segment, side by side: (T, vocab)."""
        parts = []
        for index, segment in enumerate(self.segments):
            if segment.rows is None:
                continue
            rows = slice(*segment.rows)
            if self.mapped:
                parts.append(project(self._mapped_head[rows], rows))
            elif index in self._resident:
                parts.append(project(self._rows(*self._resident[index], rows), rows))
            else:
                view, base = self._take(index)
                try:
                    parts.append(project(self._rows(view, base, rows), rows))
                finally:
                    self._give_back(index)
        return np.concatenate(parts, axis=-1)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._layers.clear()
        for copy, _ in self._resident.values():
            try:
                copy.close()
            except BufferError:  # a view of it is still alive somewhere: the map goes when it does
                pass
        self._resident.clear()

    def _rows(self, buffer: object, base: int, rows: slice) -> np.ndarray:
        entry = self.head_matrix
        columns = int(entry.shape[1])
        start = entry.raw_offset + rows.start * columns * entry.dtype.size_bytes - base
        count = (rows.stop - rows.start) * columns
        return np.frombuffer(buffer, dtype=entry.dtype.numpy_name, count=count, offset=start).reshape(-1, columns)  # type: ignore[call-overload]

    def _take(self, segment: int) -> tuple[memoryview, int]:
        assert self._reader is not None and self._taken is None
        expected = self._streamed[self._reads % len(self._streamed)]
        assert expected == segment, f"decode asked for {self.segments[segment].name} out of order"
        self._taken = self._reads
        return self._reader.take(self._reads)

    def _give_back(self, segment: int) -> None:
        if segment in self._resident or self._taken is None:
            return
        assert self._reader is not None
        self._reader.give_back(self._taken)
        self._taken = None
        self._reads += 1


def decoder_segments(manifest: Manifest, blocks: int, head_matrix: str) -> list[Segment]:
    """A decode step's weights in the order it reads them: each block's layer (layers 1..blocks), then the head matrix
    cut into row segments no larger than the largest block (whole tiles of ``ops.linear``'s decode split, so a
    segment's logits are the same floats as the whole matrix's)."""
    segments = []
    for block in range(blocks):
        layer = manifest.layers[block + 1]
        segments.append(Segment(f"block {block}", layer.raw_offset, layer.raw_size_bytes, block))
    entry = manifest.tensor(head_matrix)
    rows, columns = int(entry.shape[0]), int(entry.shape[1])
    row_bytes = columns * entry.dtype.size_bytes
    largest = max((s.size_bytes for s in segments), default=row_bytes * rows)
    per_segment = max(1, largest // row_bytes)
    if per_segment >= HEAD_ROWS_ALIGNMENT:
        per_segment -= per_segment % HEAD_ROWS_ALIGNMENT
    for first in range(0, rows, per_segment):
        end = min(rows, first + per_segment)
        offset = entry.raw_offset + first * row_bytes
        segments.append(Segment(f"head rows {first}-{end - 1}", offset, (end - first) * row_bytes, None, (first, end)))
    return segments
