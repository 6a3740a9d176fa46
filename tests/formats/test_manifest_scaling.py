"""Everything done on a manifest is linear in its size: a large legal manifest built to make per-layer or per-tensor
work quadratic (many empty row tables, many zero-size progressive tensors over many chunks) costs per entry what a
small one does. Times are ratios measured side by side in one test, generous for a busy machine."""

from __future__ import annotations

import time

import numpy as np

from streamload.download.refinements import RefinementPlan
from streamload.formats.constants import LAYER_ALIGNMENT, DType, LayerKind, QuantScheme, align_up
from streamload.formats.manifest import ChunkEntry, LayerEntry, Manifest, TensorEntry, encode_manifest, parse_manifest
from streamload.formats.summary import summarize_manifest

CHUNK_RAW_BYTES = 64


def wide_manifest(count: int) -> bytes:
    """Layer 0 in ``count`` chunks holding ``count`` zero-size progressive matrices; then ``count`` empty row tables."""
    tensors = []
    for i in range(count):
        tensors.append(TensorEntry(f"p{i}", 0, DType.I8, (0, 4), 0, QuantScheme.INT8_ROW, f"ps{i}", None, None, coarse_shift=3))
        tensors.append(TensorEntry(f"ps{i}", 0, DType.F32, (0,), 0, QuantScheme.NONE, None, None, None))
        tensors.append(TensorEntry(f"rs{i}", 0, DType.F32, (0,), 0, QuantScheme.NONE, None, None, None))
    step_bytes = count * CHUNK_RAW_BYTES
    rows_at = align_up(step_bytes, LAYER_ALIGNMENT)
    layers = [LayerEntry(0, "step", 0, step_bytes)]
    for i in range(count):
        layers.append(LayerEntry(i + 1, f"rows{i}", rows_at, 0, LayerKind.ROWS))
        tensors.append(TensorEntry(f"r{i}", i + 1, DType.I8, (0, 4), rows_at, QuantScheme.INT8_ROW, f"rs{i}", None, None))
    chunks = [ChunkEntry(i, 0, 16 * i, 16, CHUNK_RAW_BYTES * i, CHUNK_RAW_BYTES, bytes(32)) for i in range(count)]
    return encode_manifest(
        config={"architecture": "bert"},
        layers=layers,
        tensors=tensors,
        chunks=chunks,
        tokenizer=None,
        chunk_size_bytes=CHUNK_RAW_BYTES,
        int8_histogram=None,
    )


def use(manifest: Manifest) -> None:
    """What a client and the server do with a manifest before any data: parse it (done), plan its refinements, look
    at each layer's tensors and chunks, summarize it."""
    table = manifest.file_order_table()
    base = np.flatnonzero(table.pass_index == 0)
    by_layer = base[np.argsort(table.layer[base], kind="stable")]
    positions = np.split(by_layer, np.cumsum(np.bincount(table.layer[base], minlength=len(manifest.layers)))[:-1])
    position_of = np.full(int(table.index.max()) + 1, -1, np.int64)
    position_of[table.index] = np.arange(len(table))
    RefinementPlan.build(manifest, table, positions, position_of)
    for layer in manifest.layers:
        manifest.tensors_of_layer(layer.index)
        manifest.chunks_of_layer(layer.index)
        manifest.refinements_of_layer(layer.index)
    summarize_manifest(manifest)


def seconds_per_entry(count: int, repeats: int) -> float:
    data = wide_manifest(count)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        use(parse_manifest(data))
        best = min(best, time.perf_counter() - started)
    return best / count


def test_a_large_manifest_costs_per_entry_what_a_small_one_does() -> None:
    small = seconds_per_entry(200, repeats=5)
    large = seconds_per_entry(8000, repeats=2)  # 40 times the entries: a quadratic step costs ~40 times more per entry
    assert large < 10 * small, f"{large * 1e6:.1f} us per entry at 8,000 against {small * 1e6:.1f} at 200"
