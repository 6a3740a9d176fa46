"""The writer's chunks compressed on a thread pool and spilled, in order, to its temporary data file.

``ChunkSpill.submit`` hands one chunk's raw bytes to the pool (``threads`` workers) and then writes finished frames in
submission order until at most twice ``threads`` chunks are in flight, so memory stays near a few chunks; each frame
written gets its ``ChunkEntry`` (offset in the data region, sizes, sha256 of the frame, pass).

Threads: the caller's, plus the pool's (``slm-compress``), which run zstd (it releases the GIL) and sha256.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
from pathlib import Path

import zstandard

from .manifest import ChunkEntry
from .page_cache import PageReleasingFile


def _compress(raw: bytes, level: int) -> tuple[bytes, bytes]:
    """Compress one chunk (releases the GIL) and hash the result."""
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return frame, hashlib.sha256(frame).digest()


class ChunkSpill:
    """Chunks compressed in parallel and appended in order to the data file at ``path``; ``chunks`` lists them."""

    def __init__(self, path: Path, threads: int) -> None:
        self.path = path
        self._threads = threads
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="slm-compress")
        # (future of (frame, sha256), layer index, raw offset, raw size, pass), in submission order
        self._in_flight: collections.deque[tuple[concurrent.futures.Future[tuple[bytes, bytes]], int, int, int, int]] = collections.deque()
        self._data = PageReleasingFile(path, "wb")
        self.chunks: list[ChunkEntry] = []
        self.size_bytes = 0  # of the frames written: the data region's size

    def submit(self, raw: bytes, level: int, layer_index: int, raw_offset: int, pass_index: int) -> None:
        """Compress one chunk on the pool; write finished ones until at most twice ``threads`` are in flight."""
        future = self._pool.submit(_compress, raw, level)
        self._in_flight.append((future, layer_index, raw_offset, len(raw), pass_index))
        self._drain(2 * self._threads)

    def close(self) -> None:
        """Write every chunk still in flight and close the data file (it stays at ``path`` for the writer to copy)."""
        self._drain(0)
        self._pool.shutdown()
        self._data.file.close()

    def abort(self) -> None:
        """Drop the chunks in flight and the data file."""
        for future, *_ in self._in_flight:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._data.file.close()
        self.path.unlink(missing_ok=True)

    def _drain(self, keep: int) -> None:
        """Write finished chunks in order until at most ``keep`` are in flight."""
        while len(self._in_flight) > keep:
            future, layer_index, raw_offset, raw_size, pass_index = self._in_flight.popleft()
            frame, sha = future.result()
            self._data.write(frame)
            self.chunks.append(
                ChunkEntry(
                    index=len(self.chunks),
                    layer_index=layer_index,
                    offset=self.size_bytes,
                    size_bytes=len(frame),
                    raw_offset=raw_offset,
                    raw_size_bytes=raw_size,
                    sha256=sha,
                    pass_index=pass_index,
                )
            )
            self.size_bytes += len(frame)
