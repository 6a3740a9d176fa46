"""Chunks a model shares with the models already in the cache: copied from their stores instead of downloaded.

A chunk's sha256 (of its compressed bytes) is its identity: two manifests that list the same sha256 hold the same
raw bytes there. Before a download starts, ``copy_shared_chunks`` looks through the other models of the cache (each
one's header and journal) for the chunks the new model lacks, reads every match's raw bytes from that model's store,
checks them against the xxh3 that model journaled when the chunk passed its sha256 check, and only then writes them
into the new store and journals them (fdatasync first, as ``GroupCommitter`` does): a chunk whose copy does not match
is left to the download. A kill at any point leaves a journal naming only whole, checked copies.

The other models are only read: their files are never written or locked, and a model removed meanwhile just
copies nothing. A chunk that overlaps a progressive tensor of the model it would come from is not taken from it (its
store holds the folded exact values, not the coarse levels its chunk decompresses to).

Costs: every other cached header is parsed (about 0.25 s for a manifest of 600,000 chunks) and its journal read;
each copied byte is read, hashed (xxh3, tens of GB/s) and written once, a chunk at a time. Threads: ``copy_shared_chunks`` blocks: it
runs on a worker thread (``asyncio.to_thread``) before the download starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from ..errors import CacheError, FormatError
from ..formats import Manifest
from ..formats.chunk_table import ChunkTable
from ..formats.reader import read_header
from .model_cache import ModelCache

logger = logging.getLogger(__name__)

COMMIT_EVERY_BYTES = 64 << 20  # copied bytes between two commits (fdatasync + journal): what a kill can cost


@dataclasses.dataclass(frozen=True, slots=True)
class HeldModel:
    """Another model in the cache, as far as its journal says it is there."""

    digest: str
    directory: Path
    manifest: Manifest
    journal: dict[int, int]  # chunk index -> xxh3 of its stored bytes

    @property
    def store_path(self) -> Path:
        return self.directory / "store.bin"

    def progressive_overlap(self, raw_offset: np.ndarray, raw_size: np.ndarray) -> np.ndarray:
        """Per range: whether it overlaps a progressive tensor (whose stored bytes are not what its chunks decompress to)."""
        overlap = np.zeros(len(raw_offset), bool)
        for tensor in self.manifest.tensors:
            if tensor.coarse_shift is not None:
                overlap |= (raw_offset < tensor.raw_end) & (tensor.raw_offset < raw_offset + raw_size)
        return overlap


def read_held_model(cache_root: Path, digest: str) -> HeldModel | None:
    """A cached model's manifest and journal, or None (not there, no journal, an unreadable header)."""
    try:
        cache = ModelCache(cache_root, digest)
    except CacheError:
        return None
    raw = cache.read_header()
    if raw is None:
        return None
    try:
        _, manifest = read_header(raw, None)
    except FormatError as exc:
        logger.debug("the cached header of %s is unreadable (%s): no chunk is taken from it", digest[:12], exc)
        return None
    if manifest.digest != digest:
        return None
    try:
        journal = cache.read_journal(len(manifest.chunk_table) + len(manifest.refinement_chunks))
    except CacheError:
        return None
    return HeldModel(digest, cache.directory, manifest, journal) if journal else None


def held_models(cache_root: Path, exclude: str) -> Iterator[HeldModel]:
    """Every other model of the cache with journaled chunks, most recently used first."""
    models = cache_root / "models"
    try:
        directories = sorted((d for d in models.iterdir() if d.is_dir() and d.name != exclude), key=_mtime, reverse=True)
    except OSError:
        return
    for directory in directories:
        held = read_held_model(cache_root, directory.name)
        if held is not None:
            yield held


def holds_other_models(cache_root: Path, exclude: str) -> bool:
    """Whether the cache has a directory of another model than ``exclude`` (a probe: no header or journal is read)."""
    try:
        return any(directory.name != exclude for directory in (cache_root / "models").iterdir())
    except OSError:
        return False


def holds_complete_model(cache_root: Path) -> bool:
    """Whether the cache holds a complete model (a probe of its directory: no header is read)."""
    try:
        return any((directory / "complete").exists() for directory in (cache_root / "models").iterdir())
    except OSError:
        return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_checked(held: HeldModel, ranges: list[tuple[int, int, int]]) -> Iterator[bytes | None]:
    """The stored bytes of ``held``'s chunks (chunk index, store offset, size), one at a time, each checked against its
    journaled xxh3 (None where it is not journaled, cannot be read, or differs)."""
    try:
        fd = os.open(held.store_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        yield from [None] * len(ranges)
        return
    try:
        for index, raw_offset, raw_size in ranges:
            digest = held.journal.get(index)
            try:
                data = os.pread(fd, raw_size, raw_offset) if digest is not None else b""
            except OSError:
                data = b""
            yield data if digest is not None and len(data) == raw_size and xxhash.xxh3_64_intdigest(data) == digest else None
    finally:
        os.close(fd)


def _sha_keys(table: ChunkTable, positions: np.ndarray) -> list[bytes]:
    rows = np.ascontiguousarray(table.sha256[positions])
    return [row.tobytes() for row in rows]


@dataclasses.dataclass(slots=True)
class CopyOutcome:
    """What ``copy_shared_chunks`` copied: chunk index -> journaled xxh3, and the compressed bytes they stand for."""

    journaled: dict[int, int] = dataclasses.field(default_factory=dict)
    compressed_bytes: int = 0
    raw_bytes: int = 0
    donors: dict[str, int] = dataclasses.field(default_factory=dict)  # digest of a cached model copied from -> its chunks copied


def copy_shared_chunks(cache_root: Path, cache: ModelCache, table: ChunkTable, pending: np.ndarray) -> CopyOutcome:
    """Copy into ``cache`` (its store open) every pending pass-0 chunk (positions in ``table``) that another cached
    model holds, checked; returns what was copied and journaled."""
    outcome = CopyOutcome()
    wanted_positions = pending[table.pass_index[pending] == 0]
    if not len(wanted_positions):
        return outcome
    wanted = dict(zip(_sha_keys(table, wanted_positions), wanted_positions.tolist(), strict=True))
    records: list[tuple[int, int]] = []
    uncommitted = 0
    for held in held_models(cache_root, cache.digest):
        other = held.manifest.chunk_table
        journaled = np.fromiter(held.journal, np.int64, len(held.journal))
        positions = np.flatnonzero(np.isin(other.index, journaled) & (other.pass_index == 0))
        positions = positions[~held.progressive_overlap(other.raw_offset[positions], other.raw_size[positions])]
        matches = [(p, wanted[key]) for p, key in zip(positions.tolist(), _sha_keys(other, positions), strict=True) if key in wanted]
        if not matches:
            continue
        ranges = [(int(other.index[p]), int(other.raw_offset[p]), int(other.raw_size[p])) for p, _ in matches]
        for (_, target), data in zip(matches, read_checked(held, ranges), strict=True):
            if data is None or int(table.raw_size[target]) != len(data):
                continue
            cache.write_chunks(int(table.raw_offset[target]), [data])
            index = int(table.index[target])
            records.append((index, xxhash.xxh3_64_intdigest(data)))
            outcome.compressed_bytes += int(table.size[target])
            outcome.raw_bytes += len(data)
            outcome.donors[held.digest] = outcome.donors.get(held.digest, 0) + 1
            del wanted[_sha_keys(table, np.array([target]))[0]]
            uncommitted += len(data)
            if uncommitted >= COMMIT_EVERY_BYTES:
                cache.commit_chunks(records)
                outcome.journaled.update(records)
                records, uncommitted = [], 0
        if not wanted:
            break
    if records:
        cache.commit_chunks(records)
        outcome.journaled.update(records)
    if outcome.journaled:
        logger.info(
            "copied %d chunks (%d bytes compressed) from %d cached models instead of downloading them",
            len(outcome.journaled),
            outcome.compressed_bytes,
            len(outcome.donors),
        )
    return outcome
