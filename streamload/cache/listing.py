"""What a cache directory holds, as ``streamload list`` shows it and ``streamload rm`` removes it; the cached models a
name, a source or a digest prefix names (``streamload run NAME``).

Read with the cache's own rules (``files.read_own_file``): a link or a FIFO in place of a file is an unreadable file,
never followed or waited on. ``rm`` removes a model directory that is a link by removing the link alone, and
deletes nothing through a ``models/`` or ``refs/`` that is a link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import CacheError
from .files import (
    COMPLETE_NAME,
    HEADER_NAME,
    JOURNAL_NAME,
    JOURNAL_RECORD,
    LOCK_NAME,
    MAX_HEADER_BYTES,
    MODELS_DIR,
    REFS_DIR,
    cache_error,
    open_own_file,
    read_own_file,
)
from .refs import parse_ref


@dataclasses.dataclass(frozen=True, slots=True)
class CachedModel:
    """One model directory in the cache, as ``streamload list`` shows it."""

    digest: str
    directory: Path
    size_bytes: int  # on disk: header, store (allocated blocks), journal
    complete: bool
    chunks_done: int
    header: bytes | None  # preamble + manifest, for the architecture and chunk count
    sources: tuple[str, ...]  # URLs whose last digest this is, and local files it was read from (refs)


def list_cached_models(root: Path) -> list[CachedModel]:
    """Every model directory under ``root``, newest first."""
    refs: dict[str, list[str]] = {}
    for ref in (root / REFS_DIR).glob("*") if (root / REFS_DIR).is_dir() else []:
        digest, url = parse_ref(ref)
        refs.setdefault(digest, []).append(url)
    found = []
    for directory in (root / MODELS_DIR).iterdir() if (root / MODELS_DIR).is_dir() else []:
        try:
            if not directory.is_dir():
                continue
            size = 0
            for path in directory.iterdir():
                with contextlib.suppress(OSError):
                    size += path.lstat().st_blocks * 512
            journal = directory / JOURNAL_NAME
            journal_stat = journal.lstat() if journal.exists() else None
            done = journal_stat.st_size // JOURNAL_RECORD.size if journal_stat and stat.S_ISREG(journal_stat.st_mode) else 0
            try:
                header: bytes | None = read_own_file(directory / HEADER_NAME, MAX_HEADER_BYTES)
            except OSError:
                header = None
            modified = directory.stat().st_mtime
        except OSError:  # removed meanwhile, or unreadable
            continue
        found.append(
            (
                modified,
                CachedModel(
                    directory.name,
                    directory,
                    size,
                    (directory / COMPLETE_NAME).exists(),
                    done,
                    header,
                    tuple(u for u in refs.get(directory.name, []) if u),
                ),
            )
        )
    return [model for _, model in sorted(found, key=lambda pair: pair[0], reverse=True)]


def remove_cached_model(root: Path, digest: str) -> None:
    """Delete one model directory and the URL refs that point to it; refuses while a process is writing it.

    A model directory that is a link is removed as a link: nothing it points to is touched."""
    models = root / MODELS_DIR
    directory = models / digest
    try:
        if not stat.S_ISDIR(os.lstat(models).st_mode):
            raise OSError(errno.ELOOP, "is a symbolic link or not a directory; streamload never deletes through it: remove it", str(models))
        found = os.lstat(directory)
    except FileNotFoundError:
        raise CacheError(f"no cached model {digest} in {root}") from None
    except OSError as exc:
        raise cache_error("removing", directory, exc) from None
    if stat.S_ISLNK(found.st_mode):
        try:
            directory.unlink()
        except OSError as exc:
            raise cache_error("removing", directory, exc) from None
    elif not stat.S_ISDIR(found.st_mode):
        raise CacheError(f"{directory} is not a directory; remove it by hand")
    else:
        _remove_locked(directory, digest)
    refs = root / REFS_DIR
    with contextlib.suppress(OSError):
        if not stat.S_ISDIR(os.lstat(refs).st_mode):
            return  # a link: its files are not the cache's to delete
    for ref in refs.glob("*") if refs.is_dir() else []:
        if parse_ref(ref)[0] == digest:
            with contextlib.suppress(OSError):
                ref.unlink()


def _remove_locked(directory: Path, digest: str) -> None:
    """rmtree under the directory's writer lock (its lock file opened without following a link)."""
    lock = directory / LOCK_NAME
    try:
        fd = open_own_file(lock, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise cache_error("locking", lock, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"model {digest[:12]} is being downloaded by another process; try again when it is done") from None
        try:
            shutil.rmtree(directory)
        except OSError as exc:
            raise cache_error("removing", directory, exc) from None
    finally:
        os.close(fd)


def model_name(sources: Sequence[str]) -> str:
    """A cached model's name: the file name of its first source, less ``.slm`` (``minilm`` for .../minilm.slm)."""
    for source in sources:
        name = source.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
        if name:
            return name.removesuffix(".slm")
    return "-"


def find_cached_models(root: str | os.PathLike[str], source: str) -> list[CachedModel]:
    """The cached models ``source`` names, as ``streamload list`` shows them: by name (the file name, with or without
    ``.slm``), by a URL or file they came from, or by a digest prefix (4 hex digits or more, ``sha256:`` optional).

    A name that fits several models returns them all: the caller says which and asks for a digest prefix.
    """
    cached = list_cached_models(Path(root))
    plain = source.split("#")[0]
    by_source = [m for m in cached if plain in {s.split("#")[0] for s in m.sources}]
    if by_source:
        return by_source
    by_name = [m for m in cached if source.removesuffix(".slm") in {model_name([s]) for s in m.sources}]
    if by_name:
        return by_name
    prefix = source.lower().removeprefix("sha256:")
    return [m for m in cached if m.digest.startswith(prefix)] if re.fullmatch(r"[0-9a-f]{4,64}", prefix) else []


def one_cached_model(root: str | os.PathLike[str], source: str) -> CachedModel:
    """The one ``CachedModel`` ``source`` names (``find_cached_models``).

    Raises:
        CacheError: none, or several (each listed by name and digest).
    """
    matches = find_cached_models(root, source)
    if not matches:
        raise CacheError(f"{source}: no such file, and no cached model of that name or digest in {root}")
    if len(matches) > 1:
        listed = ", ".join(f"{model_name(m.sources)} sha256:{m.digest[:12]}" for m in matches)
        raise CacheError(f"{source!r} names {len(matches)} cached models ({listed}): give a digest prefix")
    return matches[0]
