"""The on-disk cache: one directory per model, keyed by its manifest digest.

    <cache_dir>/models/<digest>/header.slm   preamble + manifest, exactly as fetched
    <cache_dir>/models/<digest>/store.bin    the layer store (FORMAT.md), preallocated
    <cache_dir>/models/<digest>/journal      u32 indices of chunks verified and written, appended
    <cache_dir>/models/<digest>/complete     present once every chunk is in the store
    <cache_dir>/models/<digest>/lock         flock: one writer at a time
    <cache_dir>/refs/<sha256(url)>           "<digest>\\n<url>": the digest a URL last had (offline use)

A chunk's index is appended to the journal only after its bytes are in the
store and flushed to disk (``GroupCommitter``: every 1 s while the network is
the bottleneck, every 5 s while the CPU is), so a process killed at any point,
or a power cut, leaves a journal that names only whole, verified, durable
chunks; the next run fetches exactly the others.

Threads: store writes (``write_chunks``, pwritev at distinct offsets) come from the
pool threads at once; commits from the committer's one thread; everything else
from the event loop. A cross-process flock keeps other processes out.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import shutil
import struct
import time
from pathlib import Path

from .errors import CacheError
from .stats import DownloadStats

logger = logging.getLogger(__name__)

JOURNAL_RECORD = struct.Struct("<I")  # chunk index
IOV_MAX = 1024  # buffers per pwritev (POSIX minimum, Linux's limit)
LOCK_POLL_S = 0.1


def default_cache_dir() -> Path:
    """``$STREAMLOAD_CACHE`` if set, else ``~/.cache/streamload`` (read when called, never at import)."""
    configured = os.environ.get("STREAMLOAD_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "streamload"


def _cache_error(action: str, path: Path, exc: OSError) -> CacheError:
    """``action`` is a gerund: "writing", "committing"."""
    if exc.errno == errno.ENOSPC:
        return CacheError(
            f"no space left on the device holding {path} while {action} it; free some space or pass --cache-dir on another disk"
        )
    return CacheError(f"{action} {path} failed: {exc.strerror or exc}; check the cache directory's permissions, or pass --cache-dir")


class ModelCache:
    """The cache directory of one model (by digest), owned by one download session (see the module doc for threads)."""

    def __init__(self, root: Path, digest: str) -> None:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CacheError(f"not a sha256 hex digest: {digest!r}")
        self.root = root
        self.digest = digest
        self.directory = root / "models" / digest
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._store_fd: int | None = None
        self.store_map: mmap.mmap | None = None

    # ------------------------------------------------------------ refs and header

    @staticmethod
    def ref_path(root: Path, url: str) -> Path:
        return root / "refs" / hashlib.sha256(url.encode()).hexdigest()

    @staticmethod
    def read_ref(root: Path, url: str) -> str | None:
        """The digest a URL had when last fetched."""
        return _parse_ref(ModelCache.ref_path(root, url))[0] or None

    @staticmethod
    def write_ref(root: Path, url: str, digest: str) -> None:
        path = ModelCache.ref_path(root, url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_atomically(path, f"{digest}\n{url}".encode())
        except OSError as exc:
            raise _cache_error("writing", path, exc) from None

    @property
    def header_path(self) -> Path:
        return self.directory / "header.slm"

    @property
    def store_path(self) -> Path:
        return self.directory / "store.bin"

    def read_header(self) -> bytes | None:
        try:
            return self.header_path.read_bytes()
        except OSError:
            return None

    def write_header(self, header: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.read_header() != header:
                _write_atomically(self.header_path, header)
        except OSError as exc:
            raise _cache_error("writing", self.header_path, exc) from None

    def is_complete(self) -> bool:
        return (self.directory / "complete").exists()

    # ------------------------------------------------------------ the writer lock

    async def acquire(self) -> None:
        """Take the directory's writer lock, waiting (without blocking the loop) while another process holds it."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _cache_error("creating", self.directory, exc) from None
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    logger.info("another process is writing %s; waiting for it", self.directory)
                    waited = True
                await asyncio.sleep(LOCK_POLL_S)
        self._lock_fd = fd

    # ------------------------------------------------------------ store and journal

    def open_store(self, size_bytes: int) -> None:
        """Create, preallocate and map the store, after checking the disk has room for what is not yet allocated.

        Preallocated (posix_fallocate): the store's blocks are reserved up front, so its writes
        cannot run out of space halfway (and a warmed, interleaved probe found pwrite into them no
        slower than into a sparse file). Writes go through pwrite, never the map, so a failure is
        a clean error, not a SIGBUS.
        """
        try:
            free = shutil.disk_usage(self.directory).free
            allocated = os.stat(self.store_path).st_blocks * 512 if self.store_path.exists() else 0
        except OSError:
            free, allocated = None, 0
        needed = max(0, size_bytes - allocated)  # a store preallocated by an earlier run needs no new space
        if free is not None and needed > free:
            raise CacheError(
                f"the model needs {_human(needed)} more in {self.directory}, but only {_human(free)} are free; "
                "free some space or pass --cache-dir on another disk"
            )
        try:
            fd = os.open(self.store_path, os.O_RDWR | os.O_CREAT, 0o644)
            self._store_fd = fd
            if os.fstat(fd).st_size != size_bytes:
                os.ftruncate(fd, size_bytes)
            if size_bytes:
                os.posix_fallocate(fd, 0, size_bytes)
                self.store_map = mmap.mmap(fd, size_bytes, access=mmap.ACCESS_READ)  # readers' views; writes use pwrite
            self._journal_fd = os.open(self.directory / "journal", os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            torn = os.fstat(self._journal_fd).st_size % JOURNAL_RECORD.size
            if torn:  # a record cut short by a crash: drop it, or every later append would be read misaligned
                os.ftruncate(self._journal_fd, os.fstat(self._journal_fd).st_size - torn)
        except OSError as exc:
            self.close()
            raise _cache_error("preparing", self.store_path, exc) from None

    def read_journal(self, chunk_count: int) -> set[int]:
        """Indices of chunks already verified and stored (a torn last record is ignored)."""
        try:
            data = (self.directory / "journal").read_bytes()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise _cache_error("reading", self.directory / "journal", exc) from None
        usable = len(data) - len(data) % JOURNAL_RECORD.size
        return {i for (i,) in JOURNAL_RECORD.iter_unpack(data[:usable]) if i < chunk_count}

    def write_chunks(self, raw_offset: int, pieces: list[bytes | memoryview]) -> None:
        """Write decompressed bytes, back to back from ``raw_offset``, into the store (pwritev: one call for a run of
        small chunks; no page faults on a fresh map). Called by pool threads at once, at distinct offsets."""
        assert self._store_fd is not None
        try:
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
            raise _cache_error("writing", self.store_path, exc) from None

    def commit_chunks(self, chunk_indices: list[int]) -> None:
        """Make written chunks durable, then journal them (group commit; runs on the commit thread).

        fdatasync first, journal second: after a crash or a power cut the journal names
        only chunks whose bytes are on disk. One write(2) with O_APPEND per batch.
        """
        assert self._journal_fd is not None and self._store_fd is not None
        try:
            os.fdatasync(self._store_fd)
            os.write(self._journal_fd, b"".join(JOURNAL_RECORD.pack(i) for i in chunk_indices))
        except OSError as exc:
            raise _cache_error("committing", self.directory / "journal", exc) from None

    def mark_complete(self) -> None:
        """Every chunk is committed: make the journal durable and drop the marker that says so."""
        try:
            if self._journal_fd is not None:
                os.fsync(self._journal_fd)
            _write_atomically(self.directory / "complete", b"")
        except OSError as exc:
            raise _cache_error("finishing", self.directory, exc) from None

    def close(self) -> None:
        if self.store_map is not None:
            try:
                self.store_map.close()
            except BufferError:  # numpy views still alive; the map goes when they do
                pass
            self.store_map = None
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
        self.uncommitted: list[int] = []  # written to the store, not yet durable and journaled
        self.running: asyncio.Future[None] | None = None
        self.failed: asyncio.Future[None] = loop.create_future()  # gets the first commit failure
        self.commit_s = 0.0
        self._last_commit = time.perf_counter()
        self._wait_at_commit = stats.receive_wait_s

    def add(self, chunk_indices: list[int]) -> None:
        """Chunks are verified and written: journal them with the next group."""
        self.uncommitted.extend(chunk_indices)
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        if self.running is not None or not self.uncommitted or self.failed.done():
            return
        if commit_due(time.perf_counter() - self._last_commit, self.stats.receive_wait_s - self._wait_at_commit):
            self._start()

    def _start(self) -> None:
        batch, self.uncommitted = self.uncommitted, []
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
        while self.running is not None or self.uncommitted:
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
        if self.uncommitted and not self.failed.done():
            batch, self.uncommitted = self.uncommitted, []
            try:
                await self.loop.run_in_executor(self.pool, self.cache.commit_chunks, batch)
            except CacheError as exc:
                logger.warning("could not save %d downloaded chunks to the cache: %s", len(batch), exc)
        self.pool.shutdown(wait=True)


@dataclasses.dataclass(frozen=True, slots=True)
class CachedModel:
    """One model directory in the cache, as ``streamload list`` shows it."""

    digest: str
    directory: Path
    size_bytes: int  # on disk: header, store (allocated blocks), journal
    complete: bool
    chunks_done: int
    header: bytes | None  # preamble + manifest, for the architecture and chunk count
    sources: tuple[str, ...]  # URLs whose last digest this is (refs)


def list_cached_models(root: Path) -> list[CachedModel]:
    """Every model directory under ``root``, newest first."""
    refs: dict[str, list[str]] = {}
    for ref in (root / "refs").glob("*") if (root / "refs").is_dir() else []:
        digest, url = _parse_ref(ref)
        refs.setdefault(digest, []).append(url)
    found = []
    for directory in (root / "models").iterdir() if (root / "models").is_dir() else []:
        if not directory.is_dir():
            continue
        size = 0
        for path in directory.iterdir():
            with contextlib.suppress(OSError):
                size += path.stat().st_blocks * 512
        journal = directory / "journal"
        done = journal.stat().st_size // JOURNAL_RECORD.size if journal.exists() else 0
        header = (directory / "header.slm").read_bytes() if (directory / "header.slm").exists() else None
        found.append(
            CachedModel(
                directory.name,
                directory,
                size,
                (directory / "complete").exists(),
                done,
                header,
                tuple(u for u in refs.get(directory.name, []) if u),
            )
        )
    return sorted(found, key=lambda m: m.directory.stat().st_mtime, reverse=True)


def remove_cached_model(root: Path, digest: str) -> None:
    """Delete one model directory and the URL refs that point to it; refuses while a process is writing it."""
    directory = root / "models" / digest
    if not directory.is_dir():
        raise CacheError(f"no cached model {digest} in {root}")
    lock = directory / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"model {digest[:12]} is being downloaded by another process; try again when it is done") from None
        shutil.rmtree(directory)
    finally:
        os.close(fd)
    for ref in (root / "refs").glob("*") if (root / "refs").is_dir() else []:
        if _parse_ref(ref)[0] == digest:
            with contextlib.suppress(OSError):
                ref.unlink()


def _parse_ref(path: Path) -> tuple[str, str]:
    """(digest, url) of a ref file, which holds "digest\nurl" ("", "" when unreadable)."""
    try:
        digest, _, url = path.read_text().partition("\n")
    except OSError:
        return "", ""
    return digest.strip(), url.strip()


def _human(size_bytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size_bytes < 1024 or unit == "GiB":
            return f"{size_bytes:.0f} {unit}" if unit == "bytes" else f"{size_bytes:.1f} {unit}"
        size_bytes /= 1024
    raise AssertionError("unreachable")


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
