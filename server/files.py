"""The .slm files a server serves: looked up by plain name directly under one directory, memory-mapped, their
manifests read once per version of a file (off the event loop) for the ETag and the index.

Only models are served: a regular file (a link is followed only to a file directly inside the directory) whose
preamble is a .slm preamble and whose manifest parses (or is over max_manifest_bytes, and so is not read). Anything
else under a model's name (a link to ``.env``, a symlink loop, a FIFO, a damaged file) is a 404 and is not listed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import mmap
import os
import re
import stat as stat_module
from pathlib import Path

from ..formats import FormatError
from ..formats.delta import DELTA_PREAMBLE, index_size_needed, parse_delta_index
from ..formats.reader import PREAMBLE_SIZE_BYTES, header_size_needed, read_header, read_preamble

logger = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.slmd?$")  # models, and delta files (.slmd: docs/updates.md)


@dataclasses.dataclass(slots=True)
class ServedFile:
    path: Path
    size_bytes: int
    identity: tuple[int, int, int, int]  # (size, mtime_ns, device, inode): a change means another file
    etag: str
    last_modified: str
    map: mmap.mmap | None
    architecture: str | None
    digest: str | None
    error: str | None  # why the manifest was not read (over the server's limit), for the index; the bytes are served
    servable: bool = True  # False: not a model (remembered per version of the file, so it is not read again)


class ModelFiles:
    """The .slm files directly under one directory, opened lazily (off the event loop) and reopened when they change."""

    def __init__(self, directory: Path, max_manifest_bytes: int) -> None:
        self.directory = directory.resolve()
        self.max_manifest_bytes = max_manifest_bytes
        self._open: dict[str, ServedFile] = {}
        self._opening: dict[str, asyncio.Lock] = {}

    async def lookup(self, name: str) -> ServedFile | None:
        """The file for a URL path segment, or None: only plain .slm names directly under the directory."""
        if not MODEL_NAME.match(name):
            return None
        try:
            resolved = Path(os.path.realpath(self.directory / name, strict=True))  # a symlink loop: OSError (ELOOP)
            if resolved.parent != self.directory:
                return None  # a link out of the directory
            stat = resolved.stat()
        except OSError:
            return None
        if not stat_module.S_ISREG(stat.st_mode):
            return None  # a FIFO, a device, a directory
        identity = (stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino)
        served = self._open.get(name)
        if served is not None and served.identity == identity:
            return served if served.servable else None
        lock = self._opening.setdefault(name, asyncio.Lock())
        async with lock:  # one parse per new version of a file, however many requests ask for it at once
            served = self._open.get(name)
            if served is not None and served.identity == identity:
                return served if served.servable else None
            try:
                opened = await asyncio.to_thread(self._open_file, resolved, stat, self.max_manifest_bytes)
            except OSError:
                return None  # removed or unreadable since the stat
            if served is not None and served.map is not None:
                _close_quietly(served.map)
            self._open[name] = opened
            return opened if opened.servable else None

    def names(self) -> list[str]:
        try:
            return sorted(p.name for p in self.directory.iterdir() if MODEL_NAME.match(p.name))
        except OSError:
            return []

    def close(self) -> None:
        for served in self._open.values():
            if served.map is not None:
                _close_quietly(served.map)
        self._open.clear()

    @staticmethod
    def _open_file(path: Path, stat: os.stat_result, max_manifest_bytes: int) -> ServedFile:
        file_map = None
        # no link followed (the path is resolved), and no wait on a FIFO swapped in since the stat
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            opened = os.fstat(fd)
            if not stat_module.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (stat.st_dev, stat.st_ino):
                raise OSError(f"{path.name} changed since it was looked up")
            if stat.st_size:
                file_map = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        architecture = digest = error = None
        servable = True
        logger.debug("reading the manifest of %s", path.name)
        try:
            if path.suffix == ".slmd":  # a delta file (docs/updates.md): no manifest, but its index must parse
                if file_map is None or len(file_map) < DELTA_PREAMBLE.size:
                    raise FormatError(f"{stat.st_size} bytes is shorter than a delta file's preamble")
                needed = index_size_needed(file_map[: DELTA_PREAMBLE.size])
                parse_delta_index(file_map[: min(needed, len(file_map))], file_size_bytes=len(file_map))
                raise _NoManifest
            if file_map is None or stat.st_size < PREAMBLE_SIZE_BYTES or len(file_map) < PREAMBLE_SIZE_BYTES:
                raise FormatError(f"{stat.st_size} bytes is shorter than a .slm preamble")
            manifest_size = read_preamble(file_map[:PREAMBLE_SIZE_BYTES]).manifest_size_bytes
            if manifest_size > max_manifest_bytes:
                # Parsing costs time and memory in proportion to the manifest (msgpack can pack millions of
                # empty maps in a few MiB): a file in the directory must not make every index slow. Its
                # preamble is a model's: it is served as bytes and listed with the reason.
                error = f"its manifest is {manifest_size} bytes, over the server's limit of {max_manifest_bytes} for reading one"
                logger.warning("%s is not a readable model file (%s); serving its bytes anyway", path.name, error)
            else:
                needed = header_size_needed(file_map[:PREAMBLE_SIZE_BYTES])
                _, manifest = read_header(file_map[: min(needed, len(file_map))], len(file_map))
                architecture, digest = manifest.architecture, manifest.digest
        except _NoManifest:
            pass
        except FormatError as exc:
            servable, error = False, str(exc)
            logger.warning("%s is not a model file (%s); it is neither served nor listed", path.name, exc)
            if file_map is not None:
                _close_quietly(file_map)
                file_map = None
        # The manifest digest identifies the content (it covers every chunk hash): a strong validator
        # that is the same on every mirror. Files that do not parse fall back to size, mtime and inode.
        etag = f'"{digest}"' if digest else f'"{stat.st_size:x}-{stat.st_mtime_ns:x}-{stat.st_ino:x}"'
        return ServedFile(
            path=path,
            size_bytes=stat.st_size,
            identity=(stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino),
            etag=etag,
            last_modified=email.utils.formatdate(stat.st_mtime, usegmt=True),
            map=file_map,
            architecture=architecture,
            digest=digest,
            error=error,
            servable=servable,
        )


class _NoManifest(Exception):
    """A delta file: nothing to read for the index or the ETag."""


def _close_quietly(file_map: mmap.mmap) -> None:
    try:
        file_map.close()
    except BufferError:  # a response still writing from it; collected later
        pass
