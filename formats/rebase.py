"""Quantize a new version of a model with its base version's per-row scales, where the error bound allows.

``quantize_like`` keeps a row's base scale when that keeps its error within ``REBASE_MAX_SCALE_RATIO`` of independent
quantization's, so that the codes of rows that did not move stay equal and a delta file against the base is small
(FORMAT.md, "Quantizing against a base"). ``BaseScales`` reads a base file's scales once and quantizes the new
version's matrices a block of rows at a time with them (``convert(base=...)``), recording what it cost. Threads: the
caller's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .quantize import NO_ERROR, QuantizationReport, quantize_int8_rows

REBASE_MAX_SCALE_RATIO = 1.25
"""``quantize_like`` keeps a row's base scale s_base when the row fits (max |w| / s_base rounds into [-127, 127]) and
s_base <= this x the row's own scale: its largest error, s_base / 2, is then at most 1.25x independent quantization's
bound of half a step."""


@dataclasses.dataclass(frozen=True, slots=True)
class RebaseReport:
    """One matrix quantized with its base's scales where the error bound allows."""

    name: str
    rows: int
    rows_rebased: int  # rows that kept the base's scale
    error: QuantizationReport  # of the stored codes
    independent: QuantizationReport  # of independent quantization, for comparison


def quantize_like(
    weight: np.ndarray, base_scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray, QuantizationReport, QuantizationReport, int]:
    """Quantize ``weight`` (rows, cols) to int8 reusing ``base_scales`` row by row where that keeps the error bound.

    A row keeps its base scale s_base when max |w| / s_base rounds into [-127, 127] and s_base is at most
    REBASE_MAX_SCALE_RATIO x the row's own scale max |w| / 127 (or the row is all zero); other rows are quantized
    independently. Returns (codes, scales, error, independent quantization's error, rows rebased).
    """
    q, scales, independent = quantize_int8_rows(weight)
    block = np.asarray(weight, dtype=np.float32)
    base_scales = np.asarray(base_scales, np.float32)
    amax = np.abs(block).max(axis=1) if block.shape[1] else np.zeros(len(block), np.float32)
    fits = (base_scales > 0) & (amax <= 127.49 * base_scales)
    keep = fits & ((base_scales <= REBASE_MAX_SCALE_RATIO * scales) | (amax == 0))
    if keep.any():
        rows = np.flatnonzero(keep)
        q[rows] = np.clip(np.rint(block[rows] / base_scales[rows, None]), -127, 127).astype(np.int8)
        scales = scales.copy()
        scales[rows] = base_scales[rows]
    error = block - q.astype(np.float32) * scales[:, None]
    max_abs = float(np.abs(error).max()) if error.size else 0.0
    norms = np.linalg.norm(block, axis=1)
    rel = np.linalg.norm(error, axis=1) / np.where(norms > 0, norms, 1.0)
    return q, scales, QuantizationReport(max_abs, float(rel.max()) if rel.size else 0.0), independent, int(keep.sum())


class BaseScales:
    """The per-row scales of a base model's int8 matrices, by name (read from its file once)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .constants import QuantScheme
        from .reader import ModelReader

        self.path = Path(path)
        self._scales: dict[str, np.ndarray] = {}
        with ModelReader(self.path) as reader:
            self.digest = reader.manifest.digest
            wanted = {t.scales: t for t in reader.manifest.tensors if t.quant is QuantScheme.INT8_ROW and t.scales}
            for layer in reader.manifest.layers:
                names = [t.name for t in reader.manifest.tensors_of_layer(layer.index) if t.name in wanted]
                if names:
                    tensors = reader.read_tensors(layer.index)
                    for name in names:
                        self._scales[wanted[name].name] = np.array(tensors[name], np.float32)
        self.reports: list[RebaseReport] = []

    def quantize(self, name: str, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, QuantizationReport] | None:
        """``quantize_like`` with the base's scales of matrix ``name``; None when the base has no such matrix of that shape."""
        blocks = self.quantize_blocks(name, weight.shape[0] if weight.ndim == 2 else -1, [weight])
        if blocks is None:
            return None
        q, scales, error = next(blocks)
        return q, scales, error

    def quantize_blocks(
        self, name: str, rows: int, blocks: Iterable[np.ndarray], *, record: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, QuantizationReport]] | None:
        """``quantize_like`` over ``blocks`` of consecutive rows of matrix ``name`` (``rows`` in all), each with the base's
        scales of its rows; None when the base has no such matrix of that many rows. The tensor's report is recorded
        once every block is through."""
        base = self._scales.get(name)
        if base is None or base.shape != (rows,):
            return None

        def each() -> Iterator[tuple[np.ndarray, np.ndarray, QuantizationReport]]:
            start, rebased, error, independent = 0, 0, NO_ERROR, NO_ERROR
            for block in blocks:
                q, scales, block_error, block_independent, block_rebased = quantize_like(block, base[start : start + len(block)])
                start += len(block)
                rebased += block_rebased
                error, independent = error.merged(block_error), independent.merged(block_independent)
                yield q, scales, block_error
            if record:
                self.reports.append(RebaseReport(name, rows, rebased, error, independent))

        return each()

    def summary(self) -> dict[str, Any]:
        """Rows rebased, and the largest error against independent quantization's (ratios of the per-tensor maxima)."""
        rows = sum(r.rows for r in self.reports)
        rebased = sum(r.rows_rebased for r in self.reports)

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else 1.0

        worst = max(self.reports, key=lambda r: ratio(r.error.max_abs_error, r.independent.max_abs_error), default=None)
        return {
            "base": str(self.path),
            "base_digest": self.digest,
            "matrices": len(self.reports),
            "rows": rows,
            "rows_rebased": rebased,
            "max_abs_error_ratio": max((ratio(r.error.max_abs_error, r.independent.max_abs_error) for r in self.reports), default=1.0),
            "max_rel_error_ratio": max((ratio(r.error.max_rel_error, r.independent.max_rel_error) for r in self.reports), default=1.0),
            "max_abs_error": max((r.error.max_abs_error for r in self.reports), default=0.0),
            "independent_max_abs_error": max((r.independent.max_abs_error for r in self.reports), default=0.0),
            "worst_tensor": worst.name if worst is not None else None,
            "scale_ratio_bound": REBASE_MAX_SCALE_RATIO,
        }
