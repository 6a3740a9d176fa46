"""A progressive model's refinement plan: what each refinement chunk folds into, and with which shift.

A refinement chunk (pass 1) may be stored only after the pass-0 chunks it overlaps (its coarse levels) are; it is
folded into them with its tensor's ``coarse_shift``. A pass-0 chunk's journaled digest is of its bytes as stored,
coarse levels and all, so a check of a cached chunk needs the progressive ranges it holds; and a pass-0 chunk
fetched again overwrites what was folded into it, so its refinements are folded again after it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .formats import ChunkEntry, Manifest
from .formats.chunk_table import ChunkTable
from .formats.constants import REFINEMENT_PASS


@dataclasses.dataclass(frozen=True, slots=True)
class RefinementPlan:
    layer_refinements: list[np.ndarray]  # per layer: positions of its refinement chunks
    requires: dict[int, list[int]]  # refinement chunk index -> the pass-0 chunk indices it folds into
    shift_of: dict[int, int]  # refinement chunk index -> the coarse_shift it folds with
    coarse_ranges: dict[int, list[tuple[int, int, int]]]  # pass-0 chunk index -> (raw offset, size, shift) it holds
    refined_by: dict[int, list[ChunkEntry]]  # pass-0 chunk index -> the refinements folded into it

    @classmethod
    def build(cls, manifest: Manifest, table: ChunkTable, layer_positions: list[np.ndarray], position_of: np.ndarray) -> RefinementPlan:
        """The plan of a model (empty for a model with no progressive tensor)."""
        plan = cls([np.zeros(0, np.int64) for _ in manifest.layers], {}, {}, {}, {})
        progressive = sorted((t for t in manifest.tensors if t.coarse_shift is not None), key=lambda t: t.raw_offset)
        if not progressive:
            return plan
        layer_chunks = [[table.entry(p) for p in positions.tolist()] for positions in layer_positions]
        refinements: list[list[int]] = [[] for _ in manifest.layers]
        for chunk in (c for c in manifest.refinement_chunks if c.pass_index == REFINEMENT_PASS):
            refinements[chunk.layer_index].append(int(position_of[chunk.index]))
            starts = layer_chunks[chunk.layer_index]
            bases = [b for b in starts if b.raw_offset < chunk.raw_offset + chunk.raw_size_bytes and chunk.raw_offset < b.raw_end]
            plan.requires[chunk.index] = [b.index for b in bases]
            for base in bases:
                plan.refined_by.setdefault(base.index, []).append(chunk)
            plan.shift_of[chunk.index] = next(
                t.coarse_shift for t in progressive if t.raw_offset <= chunk.raw_offset < t.raw_end and t.coarse_shift is not None
            )
        plan.layer_refinements[:] = [np.array(positions, np.int64) for positions in refinements]
        for chunks in layer_chunks:
            for base in chunks:
                for tensor in progressive:
                    start, end = max(base.raw_offset, tensor.raw_offset), min(base.raw_end, tensor.raw_end)
                    if start < end and tensor.coarse_shift is not None:
                        plan.coarse_ranges.setdefault(base.index, []).append((start, end - start, tensor.coarse_shift))
        return plan
