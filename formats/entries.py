"""The manifest's types (frozen dataclasses: layers, tensors, chunks, tokenizer, ``Manifest``); no parsing here.

They are made by ``manifest.parse_manifest``, the bytes-to-types code, which checks every invariant while it parses:
an object that exists is valid."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .chunk_table import ChunkTable
from .constants import (
    REFINEMENT_PASS,
    Codec,
    DType,
    LayerKind,
    QuantScheme,
)

BASE_PASS = 0
"""Chunks of pass 0 hold the model (a progressive tensor's coarse levels); pass REFINEMENT_PASS makes those exact."""


@dataclasses.dataclass(frozen=True, slots=True)
class LayerEntry:
    """One execution step's worth of tensors (or one row table), contiguous in the layer store."""

    index: int
    name: str
    raw_offset: int  # in the layer store, multiple of LAYER_ALIGNMENT
    raw_size_bytes: int
    kind: LayerKind = LayerKind.STEP

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.raw_size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    """A tensor's place in the layer store and how to read its values."""

    name: str
    layer_index: int
    dtype: DType
    shape: tuple[int, ...]
    raw_offset: int  # in the layer store, multiple of TENSOR_ALIGNMENT
    quant: QuantScheme
    scales: str | None  # name of the f32 tensor of per-row scales, for INT8_ROW
    max_abs_error: float | None  # largest |w - dequant(q)| the converter introduced
    max_rel_error: float | None  # largest per-row ||w - dequant(q)|| / ||w||
    coarse_shift: int | None = None  # progressive: pass 0 holds coarse levels (quantize.coarse_levels), refinements the rest

    @property
    def size_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size_bytes

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One independent compressed frame: where it is in the file and where it lands in the store."""

    index: int
    layer_index: int
    offset: int  # from the start of the data region
    size_bytes: int  # compressed
    raw_offset: int  # in the layer store
    raw_size_bytes: int
    sha256: bytes  # of the compressed bytes; also the chunk's identity
    pass_index: int = BASE_PASS

    @property
    def end(self) -> int:
        return self.offset + self.size_bytes

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.raw_size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizerBlob:
    """tokenizer.json, compressed inside the manifest."""

    codec: Codec
    raw_size_bytes: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a reader needs before the first data byte."""

    config: Mapping[str, Any]
    layers: tuple[LayerEntry, ...]
    tensors: tuple[TensorEntry, ...]
    chunk_table: ChunkTable  # pass 0, in file order (= execution order), as columns; ``chunks`` as ChunkEntry objects
    refinement_chunks: tuple[ChunkEntry, ...]  # pass > 0, in file order: REFINEMENT_PASS ones tile the progressive tensors
    tokenizer: TokenizerBlob | None
    chunk_size_bytes: int
    int8_histogram: tuple[int, ...] | None  # counts of the 256 int8 values over all quantized weights
    digest: str  # sha256 hex of the encoded manifest bytes: the model's identity
    size_bytes: int  # length of the encoded manifest
    tensor_by_name: Mapping[str, TensorEntry] = dataclasses.field(repr=False, compare=False, default_factory=dict)
    tensors_by_layer: Mapping[int, tuple[TensorEntry, ...]] = dataclasses.field(repr=False, compare=False, default_factory=dict)
    refinements_by_layer: Mapping[int, tuple[ChunkEntry, ...]] = dataclasses.field(repr=False, compare=False, default_factory=dict)
    preview_cosine: float | None = None  # progressive: the coarse model's mean cosine to the exact one on calibration input

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture", ""))

    @property
    def store_size_bytes(self) -> int:
        return self.layers[-1].raw_end if self.layers else 0

    @property
    def chunks(self) -> tuple[ChunkEntry, ...]:
        """Pass-0 chunks in file order (= execution order), made from ``chunk_table`` on first use."""
        return self.chunk_table.entries()

    @property
    def data_size_bytes(self) -> int:
        # chunks are in file order (ascending, no overlap): the last of each list ends furthest
        ends = [int(self.chunk_table.end[-1])] if len(self.chunk_table) else []
        return max(ends + [c.end for c in self.refinement_chunks[-1:]], default=0)

    def tensor(self, name: str) -> TensorEntry:
        return self.tensor_by_name[name]

    def tensors_of_layer(self, layer_index: int) -> tuple[TensorEntry, ...]:
        return self.tensors_by_layer.get(layer_index, ())

    def chunks_of_layer(self, layer_index: int) -> tuple[ChunkEntry, ...]:
        # pass 0 tiles the layers in order: a layer's chunks are one run of the table, found by bisection
        first, end = np.searchsorted(self.chunk_table.layer, [layer_index, layer_index + 1])
        return self.chunk_table.take(np.arange(first, end)).entries()

    def refinements_of_layer(self, layer_index: int) -> tuple[ChunkEntry, ...]:
        """The REFINEMENT_PASS chunks that make this layer's progressive tensors exact (none for a plain layer)."""
        return self.refinements_by_layer.get(layer_index, ())

    @property
    def progressive(self) -> bool:
        """Some tensor arrives coarse first (its pass-0 chunks) and exact after its refinement chunks."""
        return any(t.coarse_shift is not None for t in self.tensors)

    def file_order_chunks(self) -> tuple[ChunkEntry, ...]:
        """Every chunk a reader fetches (pass 0 and refinements), in file order."""
        refinements = [c for c in self.refinement_chunks if c.pass_index == REFINEMENT_PASS]
        if not refinements:
            return self.chunks
        return tuple(sorted(self.chunks + tuple(refinements), key=lambda c: c.offset))

    def file_order_table(self) -> ChunkTable:
        """``file_order_chunks`` as a ChunkTable (no ChunkEntry is made for a model without refinements)."""
        refinements = [c for c in self.refinement_chunks if c.pass_index == REFINEMENT_PASS]
        if not refinements:
            return self.chunk_table
        merged = ChunkTable.concat([self.chunk_table, ChunkTable.from_entries(refinements)])
        return merged.take(np.argsort(merged.offset, kind="stable"))

    @property
    def step_count(self) -> int:
        """Layers that are execution steps; the row tables (if any) follow them."""
        return sum(1 for layer in self.layers if layer.kind is LayerKind.STEP)
