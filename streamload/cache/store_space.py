"""The space of a sparse layer store: reserved block by block as verified data lands, given back on failure.

Blocks of RESERVE_BLOCK_BYTES are reserved (fallocate) as the first verified chunk lands in them, so at most one
block per region being written is reserved ahead of verified data, never the whole size a manifest declares, and
a filling disk fails a reservation cleanly rather than a write halfway. ``release_unverified`` punches out what a
failed or cancelled download reserved but never filled.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

logger = logging.getLogger(__name__)

RESERVE_BLOCK_BYTES = 8 << 20
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class StoreSpace:
    """The blocks of one open store that this process reserved (pool threads reserve at once: a lock)."""

    def __init__(self, fd: int, size_bytes: int) -> None:
        self.fd = fd
        self.size_bytes = size_bytes
        self._reserved = bytearray(-(-size_bytes // RESERVE_BLOCK_BYTES))  # 1 per block this process fallocated
        self._lock = threading.Lock()

    def reserve(self, start: int, end: int) -> None:
        """fallocate the blocks that [start, end) touches, once each. Raises OSError (ENOSPC) on a full disk."""
        first, last = start // RESERVE_BLOCK_BYTES, (end - 1) // RESERVE_BLOCK_BYTES
        if all(self._reserved[first : last + 1]):
            return
        with self._lock:
            for block in range(first, last + 1):
                if not self._reserved[block]:
                    offset = block * RESERVE_BLOCK_BYTES
                    os.posix_fallocate(self.fd, offset, min(RESERVE_BLOCK_BYTES, self.size_bytes - offset))
                    self._reserved[block] = 1

    def release_unverified(self, present: list[tuple[int, int]]) -> int:
        """Give back the reserved space that holds no chunk of ``present`` ((offset, size) of every chunk the store
        holds, journaled or written). Returns the bytes released."""
        if not any(self._reserved):
            return 0
        covered = sorted(present)
        released = 0
        for block, reserved in enumerate(self._reserved):
            if not reserved:
                continue
            start, end = block * RESERVE_BLOCK_BYTES, min((block + 1) * RESERVE_BLOCK_BYTES, self.size_bytes)
            cursor = start
            for offset, size in covered:  # the gaps between present chunks inside this block
                if offset + size <= cursor:
                    continue
                if offset >= end:
                    break
                if offset > cursor:
                    released += _punch_hole(self.fd, cursor, offset - cursor)
                cursor = max(cursor, offset + size)
            if cursor < end:
                released += _punch_hole(self.fd, cursor, end - cursor)
            self._reserved[block] = 0
        return released


_libc = ctypes.CDLL(None, use_errno=True)


def _punch_hole(fd: int, offset: int, size: int) -> int:
    """Deallocate [offset, offset + size) of a file, keeping its size; 0 where the file system cannot."""
    if size <= 0:
        return 0
    result = _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, ctypes.c_int64(offset), ctypes.c_int64(size))
    if result != 0:
        logger.debug("cannot punch a hole in the store (%s)", os.strerror(ctypes.get_errno()))
        return 0
    return size
