"""float32 copies of int8 weights under a byte budget (``FloatWeightCache``), and ``dense``/``dense_t``, which use them.

``dense_t`` uses a float32 copy, dequantized once with the scales folded in (rows stacked, (outs, in)) so that
``W @ x^T`` is one sgemm, kept in a ``FloatWeightCache`` under a byte budget (the runtime keeps one per model; a
budget of 0 runs int8 only). It also fuses several projections of the same input (query, key, value) into one
matmul. Encoders, which run many tokens through the same small weights again and again, use it, with tokens as
columns (``linear_t``, ``layer_norm_t``); ``dense`` is the same with tokens as rows. Without a copy both run
``matmul.linear_t`` on the int8 weights.

State: float32 copies belong to the ``FloatWeightCache`` a caller passes (the runtime keeps one per model).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ...errors import UsageError
from .matmul import CastTiles, linear_t

if TYPE_CHECKING:
    from .decode_threads import DecodeThreads

FLOAT_WEIGHT_BUDGET_CAP_BYTES = 512 << 20


Projection = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]  # (weight (out, in), per-row scales or None, bias or None)


@dataclasses.dataclass(frozen=True, slots=True)
class FloatWeight:
    """One or more projections of the same input, ready for one sgemm: ``matrix @ x^T + bias[:, None]``."""

    matrix: np.ndarray  # (sum of outs, in) float32, C-contiguous, scales folded in
    bias: np.ndarray | None  # (sum of outs,) float32


class FloatWeightCache:
    """float32 copies of int8 weights, dequantized once, under a byte budget.

    Entries are keyed by the identity of the stored weight arrays (a model's layers hand out the same
    read-only views every time) and dropped when those arrays are. A weight is copied on its second use:
    a one-off pass (a cold start) runs int8 and does not pay for copies it would never reuse. First come,
    first kept: once the budget is spent, further weights run int8 (``linear``), so a model larger than the
    budget still runs.
    """

    def __init__(self, budget_bytes: int, *, copy_on_use: int = 2) -> None:
        self.budget_bytes = budget_bytes
        self.copy_on_use = copy_on_use
        self.used_bytes = 0
        self._entries: dict[tuple[int, ...], tuple[tuple[weakref.ref, ...], FloatWeight]] = {}
        self._uses: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()

    def get(self, projections: Sequence[Projection]) -> FloatWeight | None:
        """The float32 form of ``projections`` (made now if this is its ``copy_on_use``-th use and the budget allows), or None."""
        key = tuple(id(weight) for weight, _, _ in projections)
        entry = self._entries.get(key)
        if entry is not None and all(ref() is p[0] for ref, p in zip(entry[0], projections, strict=True)):
            return entry[1]
        uses = self._uses.get(key, 0) + 1
        if uses < self.copy_on_use:
            if uses == 1:
                weakref.finalize(projections[0][0], self._uses.pop, key, None)
            self._uses[key] = uses
            return None
        in_features = projections[0][0].shape[1]
        if any(weight.ndim != 2 or weight.shape[1] != in_features for weight, _, _ in projections):
            raise UsageError("projections fused into one matmul must share their input size")
        size_bytes = 4 * in_features * sum(weight.shape[0] for weight, _, _ in projections)
        with self._lock:
            if self.used_bytes + size_bytes > self.budget_bytes:
                return None
            self.used_bytes += size_bytes
        made = _dequantize_stacked(projections)
        refs = tuple(weakref.ref(weight) for weight, _, _ in projections)
        with self._lock:
            raced = self._entries.get(key)
            if raced is not None and all(ref() is p[0] for ref, p in zip(raced[0], projections, strict=True)):
                self.used_bytes -= size_bytes  # another thread made the same copy first: keep one
                return raced[1]
            self._entries[key] = (refs, made)
        weakref.finalize(projections[0][0], self._drop, key, size_bytes)
        return made

    def _drop(self, key: tuple[int, ...], size_bytes: int) -> None:
        with self._lock:
            if self._entries.pop(key, None) is not None:
                self.used_bytes -= size_bytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.used_bytes = 0

    def set_budget(self, budget_bytes: int) -> None:
        """Bytes the copies may use from now on; copies made under a larger budget are dropped (0: int8 only)."""
        if budget_bytes < self.used_bytes:
            self.clear()
        self.budget_bytes = budget_bytes


def _dequantize_stacked(projections: Sequence[Projection]) -> FloatWeight:
    in_features = projections[0][0].shape[1]
    outs = [weight.shape[0] for weight, _, _ in projections]
    matrix = np.empty((sum(outs), in_features), dtype=np.float32)
    has_bias = any(bias is not None for _, _, bias in projections)
    bias_all = np.zeros(sum(outs), dtype=np.float32) if has_bias else None
    start = 0
    for (weight, scales, bias), out_features in zip(projections, outs, strict=True):
        target = matrix[start : start + out_features]
        np.copyto(target, weight, casting="unsafe")
        if scales is not None:
            target *= scales[:, None]  # the same float32 product linear forms, so both paths agree exactly
        if bias_all is not None and bias is not None:
            bias_all[start : start + out_features] = bias
        start += out_features
    return FloatWeight(matrix, bias_all)


def default_float_weight_budget_bytes() -> int:
    """An eighth of physical memory, at most FLOAT_WEIGHT_BUDGET_CAP_BYTES (all-MiniLM-L6-v2 needs 42.5 MB)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 64 << 20
    return min(FLOAT_WEIGHT_BUDGET_CAP_BYTES, physical // 8)


def dense(
    x: np.ndarray,
    projections: Sequence[Projection],
    *,
    float_weights: FloatWeightCache | None = None,
    tiles: CastTiles | None = None,
    split: DecodeThreads | None = None,
) -> np.ndarray:
    """The projections of x (T, in) side by side, (T, sum of outs): ``dense_t`` on x^T, transposed back (a view)."""
    return dense_t(x.T, projections, float_weights=float_weights, tiles=tiles, split=split).T


def dense_t(
    xt: np.ndarray,
    projections: Sequence[Projection],
    *,
    float_weights: FloatWeightCache | None = None,
    tiles: CastTiles | None = None,
    split: DecodeThreads | None = None,
) -> np.ndarray:
    """The projections of xt (in, T) stacked, (sum of outs, T): one sgemm on float32 copies from ``float_weights`` when
    it has or makes them (None: int8 only), else ``linear_t`` per projection on the int8 weights, each into its rows
    (cast in ``tiles``, split at decode by ``split``: see ``linear_t``)."""
    usable = float_weights is not None and all(w.dtype == np.int8 for w, _, _ in projections)
    cached = float_weights.get(projections) if usable and float_weights is not None else None
    if cached is not None:
        y = cached.matrix @ xt
        if cached.bias is not None:
            y += cached.bias[:, None]
        return y
    if len(projections) == 1:
        return linear_t(xt, *projections[0], tiles=tiles, split=split)
    y = np.empty((sum(weight.shape[0] for weight, _, _ in projections), xt.shape[1]), dtype=np.float32)
    start = 0
    for weight, scales, bias in projections:
        linear_t(xt, weight, scales, bias, out=y[start : start + weight.shape[0]], tiles=tiles, split=split)
        start += weight.shape[0]
    return y
