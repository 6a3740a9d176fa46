"""One model's directory in the cache (keyed by its manifest digest): its header, store, journal and lock.

The layout and the rules for touching the cache's files are in ``files.py``; the group commit in ``journal.py``.

A chunk's record is appended to the journal (chunks.log) only after its bytes
are in the store and flushed to disk (``journal.GroupCommitter``: every 1 s while the
network is the bottleneck, every 5 s while the CPU is), so a process killed at
any point, or a power cut, leaves a journal that names only whole, verified,
durable chunks; the next run fetches exactly the others. The record's xxh3
digest of the stored (decompressed) bytes lets a later process check them before
it uses them (``find_damaged``): a cache that was truncated, zeroed or flipped
is fetched again, never used. xxh3 runs at tens of GB/s, so the check costs a
cached run about a millisecond per 40 MB.

Space: the store is a sparse file, reserved in blocks as verified data lands in them and given back when a
download fails (``store_space.py``).

Read-only: a complete model in a cache on a read-only file system is used as it is. Writes that are only bookkeeping
(a URL's ref, the ``complete`` marker, the lock file) are skipped with a debug log; a write the run needs (a missing
or damaged chunk) is a CacheError naming the read-only file system.

Threads: store writes (``write_chunks``, pwritev at distinct offsets) come from the
pool threads at once; commits from the committer's one thread; everything else
from the event loop. A cross-process flock keeps other processes out.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import mmap
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xxhash

from ..errors import CacheError, CacheWriteError
from ..formats.quantize import coarse_levels, fold_refinement
from .files import (
    COMPLETE_NAME,
    HEADER_NAME,
    IOV_MAX,
    JOURNAL_DTYPE,
    JOURNAL_NAME,
    JOURNAL_RECORD,
    LOCK_NAME,
    LOCK_POLL_S,
    MAX_HEADER_BYTES,
    MODELS_DIR,
    READ_ONLY_ERRNOS,
    STORE_NAME,
    cache_error,
    check_regular,
    human_size,
    make_own_directory,
    open_own_file,
    read_own_file,
    write_atomically,
)
from .store_space import StoreSpace

logger = logging.getLogger(__name__)


class ModelCache:
    """The cache directory of one model (by digest), owned by one download session (see the module doc for threads)."""

    def __init__(self, root: Path, digest: str) -> None:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CacheError(f"not a sha256 hex digest: {digest!r}")
        self.root = root
        self.digest = digest
        self.directory = root / MODELS_DIR / digest
        self.read_only = False  # set when the store could be opened only for reading (a read-only file system)
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._store_fd: int | None = None
        self._space: StoreSpace | None = None  # the store's blocks reserved as verified data lands in them
        self.store_map: mmap.mmap | None = None

    # ------------------------------------------------------------ header

    @property
    def header_path(self) -> Path:
        return self.directory / HEADER_NAME

    @property
    def store_path(self) -> Path:
        return self.directory / STORE_NAME

    def read_header(self) -> bytes | None:
        try:
            return read_own_file(self.header_path, MAX_HEADER_BYTES)
        except OSError:
            return None

    def write_header(self, header: bytes) -> None:
        try:
            self._make_directory()
            if self.read_header() != header:
                write_atomically(self.header_path, header)
        except OSError as exc:
            raise cache_error("writing", self.header_path, exc) from None

    def is_complete(self) -> bool:
        return (self.directory / COMPLETE_NAME).exists()

    # ------------------------------------------------------------ the writer lock

    async def acquire(self) -> None:
        """Take the directory's writer lock, waiting (without blocking the loop) while another process holds it."""
        try:
            self._make_directory()
            fd = self._open_lock()
        except OSError as exc:
            raise cache_error("creating", self.directory, exc) from None
        if fd is None:
            return
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.warning("another process is downloading %s into the cache; waiting for it to finish", self.directory.name[:12])
                    waited = True
                await asyncio.sleep(LOCK_POLL_S)
        self._lock_fd = fd

    def _open_lock(self) -> int | None:
        """The lock file's descriptor; on a read-only file system the existing lock opened for reading (flock needs no
        write access), or None when there is none: nobody can write this directory there either."""
        path = self.directory / LOCK_NAME
        try:
            return open_own_file(path, os.O_RDWR | os.O_CREAT)
        except OSError as exc:
            if exc.errno not in READ_ONLY_ERRNOS:
                raise
            logger.debug("cannot create or write %s (%s); locking it for reading", path, exc.strerror)
        try:
            return open_own_file(path, os.O_RDONLY)
        except FileNotFoundError:
            logger.debug("no lock file in the read-only %s; using it unlocked", self.directory)
            return None

    def _make_directory(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)  # the cache directory itself is the user's choice, a link or not
        make_own_directory(self.root / MODELS_DIR)
        make_own_directory(self.directory)

    # ------------------------------------------------------------ store and journal

    def open_store(self, size_bytes: int) -> int:
        """Create (sparse) and map the store after checking the disk has room for what is not yet allocated.

        Returns the store's size on disk before this call (smaller than ``size_bytes``: it was
        truncated, and the chunks past that size are not there). Space is reserved block by block
        as verified data arrives (``write_chunks``). Writes go through pwritev, never the map, so a
        failure is a clean error, not a SIGBUS.
        """
        try:
            free = shutil.disk_usage(self.directory).free
            allocated = os.lstat(self.store_path).st_blocks * 512 if self.store_path.exists() else 0
        except OSError:
            free, allocated = None, 0
        needed = max(0, size_bytes - allocated)
        if free is not None and needed > free:
            raise CacheWriteError(
                f"the model needs {human_size(needed)} more in {self.directory}, but only {human_size(free)} are free; "
                "free some space or use a cache directory on another disk"
            )
        try:
            try:
                fd = open_own_file(self.store_path, os.O_RDWR | os.O_CREAT)
            except OSError as exc:
                if exc.errno not in READ_ONLY_ERRNOS or not self.store_path.exists():
                    raise
                return self._open_store_read_only(size_bytes)
            self._store_fd = fd
            check_regular(fd, self.store_path, writing=True)
            size_before = os.fstat(fd).st_size
            if size_before != size_bytes:
                os.ftruncate(fd, size_bytes)
            self._space = StoreSpace(fd, size_bytes)
            if size_bytes:
                self.store_map = mmap.mmap(fd, size_bytes, access=mmap.ACCESS_READ)  # readers' views; writes use pwritev
            self._journal_fd = open_own_file(self.directory / JOURNAL_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            check_regular(self._journal_fd, self.directory / JOURNAL_NAME, writing=True)
            torn = os.fstat(self._journal_fd).st_size % JOURNAL_RECORD.size
            if torn:  # a record cut short by a crash: drop it, or every later append would be read misaligned
                os.ftruncate(self._journal_fd, os.fstat(self._journal_fd).st_size - torn)
        except OSError as exc:
            self.close()
            raise cache_error("preparing", self.store_path, exc) from None
        return min(size_before, size_bytes)

    def _open_store_read_only(self, size_bytes: int) -> int:
        """A store that cannot be written (a read-only file system): mapped as it is, for a model that needs nothing new."""
        logger.debug("%s cannot be written; using it read-only", self.store_path)
        fd = open_own_file(self.store_path, os.O_RDONLY)
        self._store_fd = fd
        self.read_only = True
        check_regular(fd, self.store_path)
        stored = os.fstat(fd).st_size
        if min(stored, size_bytes):
            self.store_map = mmap.mmap(fd, min(stored, size_bytes), access=mmap.ACCESS_READ)
        return min(stored, size_bytes)

    def read_journal(self, chunk_count: int) -> dict[int, int]:
        """Chunk index -> xxh3 of its stored bytes, for chunks already verified and stored (a torn last record is ignored)."""
        path = self.directory / JOURNAL_NAME
        try:
            data = read_own_file(path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise cache_error("reading", path, exc) from None
        usable = len(data) - len(data) % JOURNAL_RECORD.size
        return {i: digest for i, digest in JOURNAL_RECORD.iter_unpack(data[:usable]) if i < chunk_count}

    def find_damaged(
        self, chunks: list[tuple[int, int, int, int]], coarse: Mapping[int, Sequence[tuple[int, int, int]]] | None = None
    ) -> list[int]:
        """Of (chunk index, store offset, size, xxh3 when journaled), the indices whose stored bytes differ.

        ``coarse``: per chunk index, the (store offset, size, coarse_shift) ranges of progressive tensors it holds.
        Its digest is of their coarse levels, which a refinement folded in since has not changed: those ranges are
        compared at their coarse levels (``quantize.coarse_levels``, a copy).
        """
        store = self.store_map
        damaged = []
        for index, offset, size, digest in chunks:
            if store is None or offset + size > len(store):
                damaged.append(index)
                continue
            data: bytes | memoryview | np.ndarray = store[offset : offset + size]
            ranges = coarse.get(index) if coarse else None
            if ranges:
                levels = np.frombuffer(data, np.int8).copy()
                for start, length, shift in ranges:
                    piece = levels[start - offset : start - offset + length]
                    piece[:] = coarse_levels(piece, shift)
                data = levels
            if xxhash.xxh3_64_intdigest(data) != digest:
                damaged.append(index)
        return damaged

    def fold_refinement(self, raw_offset: int, refinement: bytes | memoryview, shift: int) -> np.ndarray:
        """Fold a verified refinement into the coarse levels stored at ``raw_offset`` (a pool thread); returns the exact
        values written. Idempotent (``quantize.fold_refinement``): folding twice after a crash does no harm."""
        assert self.store_map is not None
        stored = np.frombuffer(self.store_map, np.int8, len(refinement), raw_offset)
        exact = fold_refinement(stored, np.frombuffer(refinement, np.int8), shift)
        self.write_chunks(raw_offset, [memoryview(exact)])
        return exact

    def write_chunks(self, raw_offset: int, pieces: list[bytes | memoryview]) -> None:
        """Write verified, decompressed bytes back to back from ``raw_offset`` into the store.

        One pwritev for a run of small chunks; no page faults on a fresh map. Pool threads
        call this at once, at distinct offsets; the blocks it lands in are reserved first.
        """
        assert self._store_fd is not None
        try:
            if self.read_only or self._space is None:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            self._space.reserve(raw_offset, raw_offset + sum(len(piece) for piece in pieces))
            while pieces:
                group = pieces[:IOV_MAX]
                expected = sum(len(piece) for piece in group)
                written = os.pwritev(self._store_fd, group, raw_offset)
                if written != expected:  # short write (rare): finish this group piece by piece
                    rest = memoryview(b"".join(group))[written:]
                    position = raw_offset + written
                    while rest.nbytes:
                        count = os.pwrite(self._store_fd, rest, position)
                        rest, position = rest[count:], position + count
                raw_offset += expected
                pieces = pieces[IOV_MAX:]
        except OSError as exc:
            raise cache_error("writing", self.store_path, exc) from None

    def release_unverified(self, present: list[tuple[int, int]]) -> int:
        """Give back the space reserved in this process that holds no verified chunk; ``present``: (offset, size) of
        every chunk the store holds (journaled or written). Returns the bytes released."""
        return self._space.release_unverified(present) if self._space is not None else 0

    def commit_chunks(self, records: Sequence[tuple[int, int]] | np.ndarray) -> None:
        """Make written chunks durable, then journal (index, xxh3) for each (group commit; the commit thread).

        fdatasync first, journal second: after a crash or a power cut the journal names
        only chunks whose bytes are on disk. One write(2) with O_APPEND per batch. ``records``: (index, xxh3) pairs,
        or an array of JOURNAL_DTYPE (``journal_records``).
        """
        try:
            if self._journal_fd is None or self._store_fd is None or self.read_only:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            os.fdatasync(self._store_fd)
            if isinstance(records, np.ndarray):
                data = records.astype(JOURNAL_DTYPE, copy=False).tobytes()
            else:
                data = b"".join(JOURNAL_RECORD.pack(index, digest) for index, digest in records)
            os.write(self._journal_fd, data)
        except OSError as exc:
            raise cache_error("committing", self.directory / JOURNAL_NAME, exc) from None

    def mark_complete(self) -> None:
        """Every chunk is committed: make the journal durable and drop the marker that says so."""
        try:
            if self._journal_fd is not None:
                os.fsync(self._journal_fd)
            write_atomically(self.directory / COMPLETE_NAME, b"")
        except OSError as exc:
            if exc.errno in READ_ONLY_ERRNOS:  # bookkeeping: the journal says the same, and is read first
                logger.debug("cannot mark %s complete (%s)", self.directory, exc.strerror)
                return
            raise cache_error("finishing", self.directory, exc) from None

    def drop_store_pages(self, offset: int = 0, size_bytes: int = 0) -> None:
        """Unmap this process's pages of the store (``size_bytes`` from ``offset``, page-aligned; 0: to the end) and drop
        the clean ones from the page cache (best effort): a run under a memory budget does this for what it will not
        read again soon, since those pages count against it."""
        if self.store_map is not None:
            length = size_bytes or len(self.store_map) - offset
            try:
                self.store_map.madvise(mmap.MADV_DONTNEED, offset, min(length, len(self.store_map) - offset))
            except (OSError, ValueError):
                pass
        try:
            fd = os.open(self.store_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.posix_fadvise(fd, offset, size_bytes, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.store_map is not None:
            try:
                self.store_map.close()
            except BufferError:  # numpy views still alive; the map goes when they do
                pass
            self.store_map = None
        self._space = None  # its descriptor is closed below: nothing may be punched through it (or its reuse)
        for name in ("_journal_fd", "_store_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)  # closing the lock fd releases the flock
                setattr(self, name, None)
