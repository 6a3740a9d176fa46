"""Summaries of a manifest for people and scripts: layer sizes, compression, quantization error."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .constants import QuantScheme, written_format_version
from .manifest import Manifest
from .quantize import entropy_bits_per_symbol


@dataclasses.dataclass(frozen=True, slots=True)
class CompressionSummary:
    """How close a file's int8 payload comes to the order-0 entropy bound."""

    int8_weights: int
    int8_compressed_bytes: int
    entropy_bits_per_weight: float

    @property
    def entropy_bound_bytes(self) -> float:
        return self.int8_weights * self.entropy_bits_per_weight / 8

    @property
    def bound_overhead(self) -> float:
        """compressed / bound - 1: 0.01 means 1% above the best any order-0 coder can do."""
        return self.int8_compressed_bytes / self.entropy_bound_bytes - 1 if self.entropy_bound_bytes else 0.0


def summarize_compression(manifest: Manifest) -> CompressionSummary | None:
    """Entropy-bound comparison for a quantized file (None when nothing is int8)."""
    if manifest.int8_histogram is None:
        return None
    int8_ranges = sorted((t.raw_offset, t.raw_end) for t in manifest.tensors if t.quant is QuantScheme.INT8_ROW)
    compressed = 0
    position = 0
    for chunk in manifest.chunks:  # chunks hold one dtype each (the writer cuts at dtype changes)
        while position < len(int8_ranges) and int8_ranges[position][1] <= chunk.raw_offset:
            position += 1
        if position < len(int8_ranges) and int8_ranges[position][0] < chunk.raw_offset + chunk.raw_size_bytes:
            compressed += chunk.size_bytes
    # a progressive matrix's refinements (pass 1, each inside one int8 tensor) are the rest of its int8 payload
    compressed += sum(chunk.size_bytes for chunk in manifest.refinement_chunks)
    return CompressionSummary(
        int8_weights=int(sum(manifest.int8_histogram)),
        int8_compressed_bytes=compressed,
        entropy_bits_per_weight=entropy_bits_per_symbol(manifest.int8_histogram),
    )


def summarize_progressive(manifest: Manifest) -> dict[str, Any] | None:
    """A progressive file's tiers: what a preview needs (every step's pass 0: the coarse levels and the exact rest),
    what makes it exact (the refinements), the row tables; the coarse bits per matrix and the calibration's cosine."""
    if not manifest.progressive:
        return None
    steps = manifest.step_count
    progressive = [t for t in manifest.tensors if t.coarse_shift is not None]
    bits: dict[str, int] = {}
    for tensor in progressive:
        key = f"{8 - (tensor.coarse_shift or 0)} bits"
        bits[key] = bits.get(key, 0) + 1
    return {
        "coarse_tier_bytes": sum(c.size_bytes for c in manifest.chunks if c.layer_index < steps),
        "refinement_bytes": sum(c.size_bytes for c in manifest.refinement_chunks),
        "row_table_bytes": sum(c.size_bytes for c in manifest.chunks if c.layer_index >= steps),
        "progressive_matrices": len(progressive),
        "exact_matrices": sum(1 for t in manifest.tensors if t.quant is QuantScheme.INT8_ROW and t.coarse_shift is None),
        "coarse_bits": dict(sorted(bits.items())),
        "preview_cosine_on_calibration": manifest.preview_cosine,
    }


def summarize_manifest(manifest: Manifest, *, format_version: int | None = None) -> dict[str, Any]:
    """A JSON-ready description of a model file: what ``streamload inspect`` shows."""
    layers = []
    for layer in manifest.layers:
        chunks = manifest.chunks_of_layer(layer.index) + manifest.refinements_of_layer(layer.index)
        compressed = sum(c.size_bytes for c in chunks)
        layers.append(
            {
                "index": layer.index,
                "name": layer.name,
                "kind": layer.kind.value,
                "tensors": len(manifest.tensors_of_layer(layer.index)),
                "chunks": len(chunks),
                "raw_bytes": layer.raw_size_bytes,
                "compressed_bytes": compressed,
                "ratio": layer.raw_size_bytes / compressed if compressed else 1.0,
            }
        )
    quantized = [t for t in manifest.tensors if t.quant is QuantScheme.INT8_ROW]
    worst = max(quantized, key=lambda t: t.max_rel_error or 0.0, default=None)
    scale_names = {t.scales for t in quantized}
    fp32_bytes = sum(math.prod(t.shape) * 4 for t in manifest.tensors if t.name not in scale_names)
    data_bytes = sum(c.size_bytes for c in manifest.chunks + manifest.refinement_chunks)
    compression = summarize_compression(manifest)
    return {
        # the file's preamble says it; without it, the version the writer gives such a manifest
        "format_version": format_version or written_format_version(manifest.progressive),
        "architecture": manifest.architecture,
        "config": dict(manifest.config),
        "manifest_digest": manifest.digest,
        "manifest_bytes": manifest.size_bytes,
        "tokenizer_bytes": manifest.tokenizer.raw_size_bytes if manifest.tokenizer else 0,
        "data_bytes": data_bytes,
        "raw_bytes": sum(layer.raw_size_bytes for layer in manifest.layers),
        "fp32_equivalent_bytes": fp32_bytes,
        "size_vs_fp32": (data_bytes + manifest.size_bytes) / fp32_bytes if fp32_bytes else None,
        "chunk_size_bytes": manifest.chunk_size_bytes,
        "chunks": len(manifest.chunks) + len(manifest.refinement_chunks),
        "layers": layers,
        "progressive": summarize_progressive(manifest),
        "quantization": {
            "tensors_int8": len(quantized),
            "tensors_float": len(manifest.tensors) - len(quantized) - len(scale_names),
            "max_abs_error": max((t.max_abs_error or 0.0 for t in quantized), default=0.0),
            "max_rel_error": worst.max_rel_error if worst else 0.0,
            "worst_tensor": worst.name if worst else None,
        },
        "int8_payload": None
        if compression is None
        else {
            "weights": compression.int8_weights,
            "compressed_bytes": compression.int8_compressed_bytes,
            "entropy_bits_per_weight": compression.entropy_bits_per_weight,
            "entropy_bound_bytes": round(compression.entropy_bound_bytes),
            "above_bound": compression.bound_overhead,
        },
    }
