"""An update taken from what the cache holds: chunks other cached models share copied, the rest from a delta file.

Only a remote download with chunks pending comes here, before it starts (a local run's cold start imports neither
this module nor ``cache/reuse.py`` nor ``download/delta_stream.py``). ``copy_shared_chunks`` copies into the store, checked, every
pending chunk another cached model holds (a worker thread); where the manifest lists a delta file against a cached
version, ``open_delta`` reads its index and makes the stream of the pending chunks it holds.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ..cache.model_cache import ModelCache
from ..cache.reuse import HeldModel, copy_shared_chunks, holds_other_models
from ..formats.constants import PREAMBLE_SIZE_BYTES
from ..formats.delta import DeltaBase
from .cached_chunks import CachedChunks
from .delta_stream import DeltaStream, find_delta_base, open_delta
from .header import Header
from .origin import Origin

FoundBase = tuple[DeltaBase, HeldModel]  # a version the delta file is against, and what the cache holds of it


async def copy_shared(
    origin: Origin, header: Header, cache: ModelCache, cached: CachedChunks, pending: np.ndarray
) -> tuple[np.ndarray, FoundBase | None]:
    """Copy into the store what other cached models share of the ``pending`` chunks (per position; ``cached`` gains
    them). Returns the positions copied, and the cached version the manifest lists a delta file against, or None."""
    index, stats = cached.index, origin.stats
    if not await asyncio.to_thread(holds_other_models, origin.cache_root, cache.digest):
        return np.empty(0, np.int64), None  # no other model to copy from, and no version a delta could be against
    copied = await asyncio.to_thread(copy_shared_chunks, origin.cache_root, cache, index.table, np.flatnonzero(pending))
    cached.add(copied.journaled)
    stats.chunks_local, stats.bytes_local = len(copied.journaled), copied.compressed_bytes
    positions = index.positions(np.fromiter(copied.journaled, np.int64, len(copied.journaled)))
    manifest_bytes = header.raw[PREAMBLE_SIZE_BYTES : PREAMBLE_SIZE_BYTES + header.manifest.size_bytes]
    return positions, await find_delta_base(origin.cache_root, manifest_bytes)


async def open_update_delta(
    found: FoundBase, origin: Origin, header: Header, cache: ModelCache, cached: CachedChunks, pending: np.ndarray
) -> DeltaStream | None:
    """The stream of the pending chunks the delta file against ``found`` holds, or None (logged: fetched whole)."""
    return await open_delta(
        found,
        url=origin.url,
        manifest=header.manifest,
        cache=cache,
        table=cached.index.table,
        pending=np.flatnonzero(pending),
        retry=origin.retry,
        session=origin.borrowed_session,
        headers=origin.headers,
        stats=origin.stats,
    )
