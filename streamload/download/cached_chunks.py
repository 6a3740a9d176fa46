"""The chunks a model's cache held when it was opened: their journaled digests, each checked against the store once.

A chunk the journal names is usable when the store reaches its end (a store cut short lost what lay past it). Its
stored bytes are checked against the journaled xxh3 the first time the opened model uses it (``recheck``); a damaged one
leaves ``journaled`` (the download fetches it again), and so does every refinement folded into it, which is folded
again after it. Checks run on a worker thread (one xxh3 pass over the chunks' bytes); the rest on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import numpy as np

from ..cache.model_cache import ModelCache
from ..formats import ChunkEntry
from .chunk_index import ChunkIndex


class CachedChunks:
    """Chunk index -> journaled xxh3 of the chunks taken from the cache; which of them this opened model has checked."""

    def __init__(
        self, cache: ModelCache, index: ChunkIndex, journaled: Mapping[int, int], store_size_bytes: int, full_size_bytes: int
    ) -> None:
        self.cache = cache
        self.index = index
        self.store_cut_short = bool(journaled) and store_size_bytes < full_size_bytes
        table, position_of = index.table, index.position_of
        # a store cut short lost the chunks past its end, whatever the journal says
        indices = np.fromiter(journaled, np.int64, len(journaled))
        indices = indices[indices < len(position_of)]
        positions = position_of[indices]
        usable = positions >= 0
        usable[usable] = table.raw_offset[positions[usable]] + table.raw_size[positions[usable]] <= store_size_bytes
        self.journaled: dict[int, int] = {i: journaled[i] for i in indices[usable].tolist()}
        self.checked_layers: set[int] = set()  # layers whose cached chunks were checked against their digests since the model was opened
        self._checked_chunks: set[int] = set()  # cached chunks checked so (rows are checked chunk by chunk)

    def mark_checked(self, layer_index: int) -> None:
        """Every cached chunk of this layer matched its digest."""
        self.checked_layers.add(layer_index)

    def forget(self, layers: Iterable[int]) -> None:
        """These layers have chunks fetched again (damaged in the cache): checked again when next used."""
        self.checked_layers.difference_update(layers)

    def pending(self) -> np.ndarray:
        """Per position: True when the cache does not hold that chunk."""
        pending = np.ones(len(self.index.table), bool)
        pending[self.index.positions(np.fromiter(self.journaled, np.int64, len(self.journaled)))] = False
        return pending

    def add(self, journaled: Mapping[int, int]) -> None:
        """Chunks copied into the store from another cached model (already checked there)."""
        self.journaled.update(journaled)

    async def check_under_pending_refinements(self) -> int:
        """Before anything is fetched: a refinement is folded only onto coarse levels checked since the model was opened. The cached
        pass-0 chunks under refinements still to fetch are checked against their digests now (a damaged one is fetched
        again, and every refinement folded into it with it); a refinement journaled over a pass-0 chunk that is not is
        folded again after it. Returns how many were damaged. Costs one xxh3 pass over those chunks' bytes."""
        journaled, plan = self.journaled, self.index.plan
        for refinement, bases in plan.requires.items():
            if refinement in journaled and not all(b in journaled for b in bases):
                del journaled[refinement]
        under = sorted({b for refinement, bases in plan.requires.items() if refinement not in journaled for b in bases if b in journaled})
        if not under:
            return 0
        table, positions = self.index.table, self.index.positions(under)
        places = zip(under, table.raw_offset[positions].tolist(), table.raw_size[positions].tolist(), strict=True)
        cached = [(index, raw_offset, raw_size, journaled[index]) for index, raw_offset, raw_size in places]
        damaged = await asyncio.to_thread(self.cache.find_damaged, cached, plan.coarse_ranges)
        self._checked_chunks.update(under)
        for index in damaged:
            del journaled[index]
            self._checked_chunks.discard(index)
            for refinement in plan.refined_by.get(index, ()):
                journaled.pop(refinement.index, None)
        return len(damaged)

    async def recheck(self, positions: np.ndarray) -> list[ChunkEntry]:
        """Check the given chunks (positions) that came from the cache against their journaled digests (once per
        opened model). Returns the chunks to fetch again: the damaged ones and the refinements folded into them (none when
        all match), no longer journaled."""
        if not self.journaled:
            return []  # nothing came from the cache
        table, positions, plan = self.index.table, np.asarray(positions, np.int64), self.index.plan
        indices = table.index[positions].tolist()
        places = zip(indices, table.raw_offset[positions].tolist(), table.raw_size[positions].tolist(), strict=True)
        cached = [
            (index, raw_offset, raw_size, self.journaled[index])
            for index, raw_offset, raw_size in places
            if index in self.journaled and index not in self._checked_chunks
        ]
        damaged = set(await asyncio.to_thread(self.cache.find_damaged, cached, plan.coarse_ranges)) if cached else set()
        self._checked_chunks.update(index for index, *_ in cached)
        if not damaged:
            return []
        reopened = [table.entry(p) for p, index in zip(positions.tolist(), indices, strict=True) if index in damaged]
        # a pass-0 chunk fetched again overwrites what was folded into it: its refinements are folded again after it
        refolded = {r.index: r for c in reopened for r in plan.refined_by.get(c.index, ()) if r.index in self.journaled}
        reopened += [r for index, r in refolded.items() if index not in damaged]
        for chunk in reopened:
            del self.journaled[chunk.index]
            self._checked_chunks.discard(chunk.index)
        return reopened
