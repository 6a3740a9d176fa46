"""The cache's layout on disk, written once, and the rules for touching its files.

    <cache_dir>/models/<digest>/header.slm   preamble + manifest, exactly as fetched
    <cache_dir>/models/<digest>/store.bin    the layer store (FORMAT.md), sparse; space reserved as data arrives
    <cache_dir>/models/<digest>/chunks.log   (u32 chunk index, u64 xxh3 of its stored bytes) per verified chunk
    <cache_dir>/models/<digest>/complete     present once every chunk is in the store
    <cache_dir>/models/<digest>/lock         flock: one writer at a time
    <cache_dir>/refs/<sha256(url)>           "<digest>\\n<url>[\\n<etag>]": what a URL last served (``refs.py``)

Nothing is ever written through a symbolic link the cache did not make: the cache's files are opened with
O_NOFOLLOW, and ``models/``, ``refs/`` and a model's directory must be directories, not links
(``make_own_directory``). Its files are read with O_NOFOLLOW | O_NONBLOCK and must be regular files
(``read_own_file``): a link or a FIFO in their place is a damaged file. A file written to must have no other hard link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
from pathlib import Path

import numpy as np

from ..errors import CacheError, CacheWriteError
from ..formats.constants import MAX_MANIFEST_SIZE_BYTES, PREAMBLE_SIZE_BYTES

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


def human_size(size_bytes: float) -> str:
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


def check_regular(fd: int, path: Path, writing: bool = False) -> None:
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
        check_regular(fd, path)
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
