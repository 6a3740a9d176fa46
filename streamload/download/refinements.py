"""A progressive model's refinement plan: what each refinement chunk folds into, and with which shift.

A refinement chunk (pass 1) may be stored only after the pass-0 chunks it overlaps (its coarse levels) are; it is
folded into them with its tensor's ``coarse_shift``. A pass-0 chunk's journaled digest is of its bytes as stored,
coarse levels and all, so a check of a cached chunk needs the progressive ranges it holds; and a pass-0 chunk
fetched again overwrites what was folded into it, so its refinements are folded again after it.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from ..formats import ChunkEntry, Manifest
from ..formats.chunk_table import ChunkTable
from ..formats.constants import REFINEMENT_PASS


@dataclasses.dataclass(frozen=True, slots=True)
class RefinementPlan:
    layer_refinements: list[np.ndarray]  # per layer: positions of its refinement chunks
    requires: dict[int, list[int]]  # refinement chunk index -> the pass-0 chunk indices it folds into
    shift_of: dict[int, int]  # refinement chunk index -> the coarse_shift it folds with
    coarse_ranges: dict[int, list[tuple[int, int, int]]]  # pass-0 chunk index -> (raw offset, size, shift) it holds
    refined_by: dict[int, list[ChunkEntry]]  # pass-0 chunk index -> the refinements folded into it

    @classmethod
    def build(cls, manifest: Manifest, table: ChunkTable, layer_positions: list[np.ndarray], position_of: np.ndarray) -> RefinementPlan:
        """The plan of a model (empty for a model with no progressive tensor). Linear in the manifest (a bisection per
        refinement and per progressive tensor): the pass-0 chunks ascend in the store, layer after layer."""
        plan = cls([np.zeros(0, np.int64) for _ in manifest.layers], {}, {}, {}, {})
        progressive = sorted((t for t in manifest.tensors if t.coarse_shift is not None and t.size_bytes), key=lambda t: t.raw_offset)
        if not progressive:
            return plan
        base = np.concatenate([np.zeros(0, np.int64), *layer_positions])  # pass-0 positions, ascending in the store
        base_index, base_start = table.index[base], table.raw_offset[base]
        base_end = base_start + table.raw_size[base]

        def overlapping(start: int, end: int) -> range:  # positions in ``base`` of the pass-0 chunks over [start, end)
            return range(int(np.searchsorted(base_end, start, side="right")), int(np.searchsorted(base_start, end, side="left")))

        tensor_starts = [t.raw_offset for t in progressive]
        refinements: list[list[int]] = [[] for _ in manifest.layers]
        for chunk in (c for c in manifest.refinement_chunks if c.pass_index == REFINEMENT_PASS):
            refinements[chunk.layer_index].append(int(position_of[chunk.index]))
            under = overlapping(chunk.raw_offset, chunk.raw_end)
            plan.requires[chunk.index] = base_index[under.start : under.stop].tolist()
            for index in plan.requires[chunk.index]:
                plan.refined_by.setdefault(index, []).append(chunk)
            tensor = progressive[bisect.bisect_right(tensor_starts, chunk.raw_offset) - 1]  # the parser put it inside one
            assert tensor.coarse_shift is not None
            plan.shift_of[chunk.index] = tensor.coarse_shift
        plan.layer_refinements[:] = [np.array(positions, np.int64) for positions in refinements]
        for tensor in progressive:
            assert tensor.coarse_shift is not None
            for at in overlapping(tensor.raw_offset, tensor.raw_end):
                start, end = max(int(base_start[at]), tensor.raw_offset), min(int(base_end[at]), tensor.raw_end)
                plan.coarse_ranges.setdefault(int(base_index[at]), []).append((start, end - start, tensor.coarse_shift))
        return plan
