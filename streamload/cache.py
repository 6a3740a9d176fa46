"""The on-disk cache: one directory per model, keyed by its manifest digest.

    <cache_dir>/models/<digest>/header.slm   preamble + manifest, exactly as fetched
    <cache_dir>/models/<digest>/store.bin    the layer store (FORMAT.md), sparse; space reserved as data arrives
    <cache_dir>/models/<digest>/chunks.log   (u32 chunk index, u64 xxh3 of its stored bytes) per verified chunk
    <cache_dir>/models/<digest>/complete     present once every chunk is in the store
    <cache_dir>/models/<digest>/lock         flock: one writer at a time
    <cache_dir>/refs/<sha256(url)>           "<digest>\\n<url>[\\n<etag>]": what a URL last served (``refs.py``)

A chunk's record is appended to the journal (chunks.log) only after its bytes
are in the store and flushed to disk (``GroupCommitter``: every 1 s while the
network is the bottleneck, every 5 s while the CPU is), so a process killed at
any point, or a power cut, leaves a journal that names only whole, verified,
durable chunks; the next run fetches exactly the others. The record's xxh3
digest of the stored (decompressed) bytes lets a later process check them before
it uses them (``find_damaged``): a cache that was truncated, zeroed or flipped
is fetched again, never used. xxh3 runs at tens of GB/s, so the check costs a
cached run about a millisecond per 40 MB.

Space: the store is a sparse file, reserved in blocks as verified data lands in them and given back when a
download fails (``store_space.py``). Nothing is ever written through a symbolic
link the cache did not make: the cache's files are opened with O_NOFOLLOW, and ``models/``, ``refs/`` and a
model's directory must be directories, not links (``make_own_directory``). Its files are read with O_NOFOLLOW |
O_NONBLOCK and must be regular files (``read_own_file``): a link or a FIFO in their place is a damaged file.

Read-only: a complete model in a cache on a read-only file system is used as it is. Writes that are only bookkeeping
(a URL's ref, the ``complete`` marker, the lock file) are skipped with a debug log; a write the run needs (a missing
or damaged chunk) is a CacheError naming the read-only file system.

Threads: store writes (``write_chunks``, pwritev at distinct offsets) come from the
pool threads at once; commits from the committer's one thread; everything else
from the event loop. A cross-process flock keeps other processes out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import shutil
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xxhash

from .errors import CacheError, CacheWriteError
from .formats.constants import MAX_MANIFEST_SIZE_BYTES, PREAMBLE_SIZE_BYTES
from .formats.quantize import coarse_levels, fold_refinement
from .stats import DownloadStats
from .store_space import StoreSpace

logger = logging.getLogger(__name__)

# The cache's names, written once (the layout is in the module docstring)
MODELS_DIR = "models"
REFS_DIR = "refs"
HEADER_NAME = "header.slm"
STORE_NAME = "store.bin"
JOURNAL_NAME = "chunks.log"
COMPLETE_NAME = "complete"
LOCK_NAME = "lock"
NOT_OWN_DIRECTORY = "is a symbolic link or not a directory; streamload never writes through a link it did not make: remove it"
MAX_HEADER_BYTES = PREAMBLE_SIZE_BYTES + MAX_MANIFEST_SIZE_BYTES  # a larger header.slm is damaged: never read whole
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})  # a write refused by the file system or its permissions
JOURNAL_RECORD = struct.Struct("<IQ")  # chunk index, xxh3_64 of the chunk's bytes in the store
JOURNAL_DTYPE = np.dtype([("index", "<u4"), ("digest", "<u8")])  # JOURNAL_RECORD as a numpy record (packed, 12 bytes)
IOV_MAX = 1024  # buffers per pwritev (POSIX minimum, Linux's limit)
LOCK_POLL_S = 0.1


def default_cache_dir() -> Path:
    """``$STREAMLOAD_CACHE`` if set, else ``~/.cache/streamload`` (read when called, never at import)."""
    configured = os.environ.get("STREAMLOAD_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "streamload"


def cache_error(action: str, path: Path, exc: OSError) -> CacheError:
    """``action`` is a gerund: "writing", "committing"."""
    if exc.errno in (errno.ELOOP, errno.EMLINK, errno.EINVAL) and exc.filename:
        return CacheError(f"{exc.filename}: {exc.strerror}")
    if exc.errno == errno.ELOOP:
        return CacheError(f"{path}: {exc.strerror}")
    if exc.errno == errno.ENOSPC:
        return CacheWriteError(
            f"no space left on the device holding {path} while {action} it; free some space or use a cache directory on another disk"
        )
    return CacheWriteError(
        f"{action} {path} failed: {exc.strerror or exc}; check the cache directory's permissions, or use another cache directory"
    )


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
                f"the model needs {_human(needed)} more in {self.directory}, but only {_human(free)} are free; "
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
            _check_regular(fd, self.store_path, writing=True)
            size_before = os.fstat(fd).st_size
            if size_before != size_bytes:
                os.ftruncate(fd, size_bytes)
            self._space = StoreSpace(fd, size_bytes)
            if size_bytes:
                self.store_map = mmap.mmap(fd, size_bytes, access=mmap.ACCESS_READ)  # readers' views; writes use pwritev
            self._journal_fd = open_own_file(self.directory / JOURNAL_NAME, os.O_RDWR | os.O_CREAT | os.O_APPEND)
            _check_regular(self._journal_fd, self.directory / JOURNAL_NAME, writing=True)
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
        _check_regular(fd, self.store_path)
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


# Group commit: fdatasync the store, then journal what it made durable; a power cut loses at most
# the chunks stored since the last commit. While the network is the bottleneck (receivers waited
# for at least NETWORK_BOUND_WAIT_SHARE of the time since the last commit) commits cost nothing
# and come every COMMIT_INTERVAL_S; while the CPU is, the writeback they force competes with the
# pipeline (`python tools/bench_fetch.py` on loopback measures the difference), so they come every
# COMMIT_MAX_INTERVAL_S.
COMMIT_INTERVAL_S = 1.0
COMMIT_MAX_INTERVAL_S = 5.0
NETWORK_BOUND_WAIT_SHARE = 0.5


def commit_due(since_s: float, receive_wait_s: float) -> bool:
    """Whether a group commit is due ``since_s`` after the last one, receivers having waited ``receive_wait_s`` meanwhile."""
    network_bound = receive_wait_s >= NETWORK_BOUND_WAIT_SHARE * since_s
    return since_s >= COMMIT_MAX_INTERVAL_S or (since_s >= COMMIT_INTERVAL_S and network_bound)


class GroupCommitter:
    """Journals stored chunks in groups on its own thread, when ``commit_due`` says so (event-loop methods)."""

    def __init__(self, cache: ModelCache, loop: asyncio.AbstractEventLoop, stats: DownloadStats) -> None:
        self.cache = cache
        self.loop = loop
        self.stats = stats  # its receive_wait_s (receivers' summed waiting) tells network-bound from CPU-bound
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-commit")
        self._pending: list[np.ndarray] = []  # JOURNAL_DTYPE records: written to the store, not yet durable and journaled
        self.running: asyncio.Future[None] | None = None
        self.failed: asyncio.Future[None] = loop.create_future()  # gets the first commit failure
        self.commit_s = 0.0
        self._last_commit = time.perf_counter()
        self._wait_at_commit = stats.receive_wait_s

    def add_columns(self, indices: Sequence[int], digests: Sequence[int]) -> None:
        """Chunks are verified and written: journal them (index, xxh3 of the stored bytes) with the next group.
        A batch comes as two columns (no Python object per chunk)."""
        records = np.empty(len(indices), JOURNAL_DTYPE)
        records["index"] = indices
        records["digest"] = np.array(digests, np.uint64)
        self._pending.append(records)
        self._maybe_commit()

    def _take_pending(self) -> np.ndarray:
        batch = np.concatenate(self._pending) if len(self._pending) != 1 else self._pending[0]
        self._pending = []
        return batch

    def _maybe_commit(self) -> None:
        if self.running is not None or not self._pending or self.failed.done():
            return
        if commit_due(time.perf_counter() - self._last_commit, self.stats.receive_wait_s - self._wait_at_commit):
            self._start()

    def _start(self) -> None:
        batch = self._take_pending()
        started = time.perf_counter()
        self.running = self.loop.run_in_executor(self.pool, self.cache.commit_chunks, batch)
        self.running.add_done_callback(lambda done: self._committed(done, started))

    def _committed(self, done: asyncio.Future[None], started: float) -> None:
        self.running = None
        self._last_commit = time.perf_counter()
        self._wait_at_commit = self.stats.receive_wait_s
        self.commit_s += self._last_commit - started
        if not done.cancelled() and done.exception() is not None:
            if not self.failed.done():
                self.failed.set_exception(done.exception())  # type: ignore[arg-type]
                self.failed.exception()  # retrieved: a failure nobody awaits is not "never retrieved"
            return
        self._maybe_commit()

    async def watch(self) -> None:
        """Raises the first commit failure (a full disk): run beside the download, cancel when it ends."""
        await asyncio.shield(self.failed)

    async def flush(self) -> None:
        """Commit everything written so far and wait for it; raises a commit failure."""
        while self.running is not None or self._pending:
            if self.running is None:
                self._start()
            running = self.running
            assert running is not None
            await asyncio.wait([running])
            if self.failed.done():
                await self.failed

    async def mark_complete(self) -> None:
        await self.loop.run_in_executor(self.pool, self.cache.mark_complete)

    async def close(self) -> None:
        """After a stop or a failure: keep what is verified and written (a failure to is logged), then end the thread."""
        if self.running is not None:
            await asyncio.wait([self.running])
        if self._pending and not self.failed.done():
            batch = self._take_pending()
            try:
                await self.loop.run_in_executor(self.pool, self.cache.commit_chunks, batch)
            except CacheError as exc:
                logger.warning("could not save %d downloaded chunks to the cache: %s", len(batch), exc)
        self.pool.shutdown(wait=True)


def _human(size_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size_bytes < 1024 or unit == "GiB":
            return f"{size_bytes:.0f} {unit}" if unit == "bytes" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    raise AssertionError("unreachable")


def write_atomically(path: Path, data: bytes) -> None:
    """Write a new file and rename it over ``path`` (a link at ``path`` is replaced, never followed)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with open(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def make_own_directory(path: Path) -> None:
    """Make one of the cache's directories (its parent exists), refusing a link or anything else in its place (ELOOP):
    the cache writes nothing through a link it did not make."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        raise OSError(errno.ELOOP, NOT_OWN_DIRECTORY, str(path))


def _check_regular(fd: int, path: Path, writing: bool = False) -> None:
    """A FIFO or a device in place of a cache file would block or misbehave on every write: refuse it. A file written
    to must have no other hard link: writing would change that other file too."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, "is not a regular file; remove it", str(path))
    if writing and info.st_nlink > 1:
        raise OSError(errno.EMLINK, "has another hard link; streamload never writes into a file it shares: remove it", str(path))


def read_own_file(path: Path, max_size_bytes: int | None = None) -> bytes:
    """The bytes of one of the cache's files. A link is not followed (ELOOP) and a FIFO or device never waited on: anything
    but a regular file is an OSError, as a damaged file is; so is a file over ``max_size_bytes`` (EFBIG, never read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _check_regular(fd, path)
        if max_size_bytes is not None and os.fstat(fd).st_size > max_size_bytes:
            raise OSError(errno.EFBIG, f"is over {max_size_bytes} bytes", str(path))
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def open_own_file(path: Path, flags: int) -> int:
    """Open one of the cache's own files, refusing a symbolic link (ELOOP) that someone else put there."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symbolic link; streamload never writes through a link it did not make: remove it") from None
        raise
