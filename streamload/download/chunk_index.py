"""What a model's chunk table says about its layers: positions per layer, where rows start, scales layers, refinements.

Built once per open model from the manifest (``ChunkIndex.build``) and read, never changed, by the session and the
download. A position is an index into ``table`` (pass 0 and refinements, in file order): no object per chunk.
Costs: a few numpy passes over the chunk table and one over the tensors (event loop, at open).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..formats import Manifest
from ..formats.chunk_table import ChunkTable
from .refinements import RefinementPlan


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkIndex:
    """The chunk table of one model and the lookups the session and the download make in it."""

    table: ChunkTable  # pass 0 and refinements, as columns, in file order
    position_of: np.ndarray  # chunk index -> position (-1: no such chunk)
    layer_positions: list[np.ndarray]  # per layer: the positions of its pass-0 chunks (in file order)
    chunk_starts: list[np.ndarray]  # per layer: the store offsets its pass-0 chunks start at (to find a row's chunk)
    scales_layers: list[list[int]]  # per layer: the other layers holding the scales of its int8 tensors (a row table's)
    plan: RefinementPlan  # what each refinement folds into, and with which shift
    rows_from: int  # the first position of the row tables' pass-0 chunks (the scheduler fetches up to it in order)

    @classmethod
    def build(cls, manifest: Manifest) -> ChunkIndex:
        """The index of a model's chunk table."""
        table = manifest.file_order_table()
        layer_count = len(manifest.layers)
        position_of = np.full(int(table.index.max()) + 1 if len(table) else 0, -1, np.int64)
        position_of[table.index] = np.arange(len(table))
        base = np.flatnonzero(table.pass_index == 0)
        by_layer = base[np.argsort(table.layer[base], kind="stable")]
        layer_positions = np.split(by_layer, np.cumsum(np.bincount(table.layer[base], minlength=layer_count))[:-1])
        scales_layers: list[list[int]] = [[] for _ in manifest.layers]
        for tensor in manifest.tensors:
            scales = manifest.tensor_by_name.get(tensor.scales or "")
            elsewhere = scales_layers[tensor.layer_index]
            if scales is not None and scales.layer_index != tensor.layer_index and scales.layer_index not in elsewhere:
                elsewhere.append(scales.layer_index)
        rows = np.flatnonzero((table.layer >= manifest.step_count) & (table.pass_index == 0))
        return cls(
            table=table,
            position_of=position_of,
            layer_positions=layer_positions,
            chunk_starts=[table.raw_offset[positions] for positions in layer_positions],
            scales_layers=scales_layers,
            plan=RefinementPlan.build(manifest, table, layer_positions, position_of),
            rows_from=int(rows[0]) if len(rows) else len(table),
        )

    def positions(self, indices: list[int] | np.ndarray) -> np.ndarray:
        """The positions of these chunk indices (each one of the table's)."""
        return self.position_of[np.asarray(indices, np.int64)]

    def layer_chunks(self, layer_index: int) -> np.ndarray:
        """The positions of a layer's chunks: pass 0, then its refinements."""
        return np.concatenate([self.layer_positions[layer_index], self.plan.layer_refinements[layer_index]])

    def positions_of_rows(self, layer_index: int, table_offset: int, row_bytes: int, ids: np.ndarray) -> np.ndarray:
        """The positions of the chunks of a row table that hold rows ``ids`` (ascending, unique), in file order."""
        positions, starts = self.layer_positions[layer_index], self.chunk_starts[layer_index]
        first = np.searchsorted(starts, table_offset + ids * row_bytes, side="right") - 1
        last = np.searchsorted(starts, table_offset + (ids + 1) * row_bytes - 1, side="right") - 1
        wanted = sorted({int(i) for lo, hi in zip(first, last, strict=True) for i in range(lo, hi + 1)})
        return positions[np.array(wanted, np.int64)]
