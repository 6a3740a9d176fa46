"""numpy kernels for int8 weights: the matmul, norms, activations, attention pieces.

Weights stay int8 as stored. ``linear`` casts them to float32 a tile of rows at
a time into a small reused buffer and lets BLAS do the rest, then scales the
output columns by the per-row scales (cheaper than scaling the weights).
Measured in tools/bench_runtime.py; see README "Runtime".
"""

from __future__ import annotations

import math
import threading

import numpy as np

SMALL_BATCH_TOKENS = 16  # at or below this many rows of x, tiles stay cache-sized
SMALL_TILE_ROWS = 256
LARGE_TILE_ELEMENTS = 1 << 20  # 4 MiB of float32 per tile for prefill-sized inputs

_scratch = threading.local()


def _tile_buffer(elements: int) -> np.ndarray:
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < elements:
        buffer = _scratch.buffer = np.empty(elements, dtype=np.float32)
    return buffer


def linear(x: np.ndarray, weight: np.ndarray, scales: np.ndarray | None = None, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x @ (weight * scales[:, None]).T + bias, with weight int8 (out, in) or float (out, in).

    Args:
        x: (T, in) float32.
        weight: (out, in) int8 with per-row ``scales`` (out,), or float32/float16 with scales None.
        bias: (out,) or None.

    Returns:
        (T, out) float32.
    """
    if weight.dtype != np.int8:
        y = x @ weight.astype(np.float32, copy=False).T
    else:
        out_features, in_features = weight.shape
        tokens = x.shape[0]
        rows = SMALL_TILE_ROWS if tokens <= SMALL_BATCH_TOKENS else max(SMALL_TILE_ROWS, LARGE_TILE_ELEMENTS // max(1, in_features))
        rows = min(rows, out_features)
        tile = _tile_buffer(rows * in_features)
        y = np.empty((tokens, out_features), dtype=np.float32)
        for start in range(0, out_features, rows):
            stop = min(out_features, start + rows)
            w = tile[: (stop - start) * in_features].reshape(stop - start, in_features)
            np.copyto(w, weight[start:stop], casting="unsafe")  # int8 -> float32, exact
            y[:, start:stop] = x @ w.T
    if scales is not None:
        y *= scales
    if bias is not None:
        y += bias
    return y


def embedding(ids: np.ndarray, table: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Rows of an (int8 or float) embedding table, as float32: (..., hidden)."""
    rows = table[ids].astype(np.float32)
    if scales is not None:
        rows *= scales[ids][..., None]
    return rows


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def erf(x: np.ndarray) -> np.ndarray:
    """Error function, Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, ~4e-7 evaluated in float32; numpy has none)."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-a * a))


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU BERT uses: x * Phi(x)."""
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted
