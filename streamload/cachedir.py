"""What a cache directory holds, as ``streamload list`` shows it and ``streamload rm`` removes it."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
from pathlib import Path

from .cache import JOURNAL_NAME, JOURNAL_RECORD
from .errors import CacheError
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
    for ref in (root / "refs").glob("*") if (root / "refs").is_dir() else []:
        digest, url = parse_ref(ref)
        refs.setdefault(digest, []).append(url)
    found = []
    for directory in (root / "models").iterdir() if (root / "models").is_dir() else []:
        if not directory.is_dir():
            continue
        size = 0
        for path in directory.iterdir():
            with contextlib.suppress(OSError):
                size += path.stat().st_blocks * 512
        journal = directory / JOURNAL_NAME
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
        if parse_ref(ref)[0] == digest:
            with contextlib.suppress(OSError):
                ref.unlink()
