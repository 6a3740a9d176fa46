"""numpy kernels for int8 weights: the matmul, norms, activations, attention pieces.

Two ways to multiply by an int8 weight, both measured in tools/bench_runtime.py and tools/bench_embed.py:

* ``linear`` keeps weights int8 as stored: it casts them to float32 a tile of rows at a time into a small
  reused buffer and lets BLAS do the rest, then scales the output columns by the per-row scales. It reads
  4x fewer bytes than float32 weights, but numpy's int8 -> float32 cast (5-8 G weights/s on one core),
  not memory, bounds it. Decode (``decoding``) casts on two threads: a Llama with 0.74 G weights then reads its
  int8 weights at 8-9 G weights/s, against float32 weights streaming at the memory's 30 GB/s, 7.5 G weights/s
  (tools/bench_runtime.py --only-large).
* ``dense_t`` uses a float32 copy, dequantized once with the scales folded in (rows stacked, (outs, in)) so
  that ``W @ x^T`` is one sgemm, kept in a ``FloatWeightCache`` under a byte budget (the runtime keeps one per
  model; a budget of 0 runs int8 only). It also fuses several projections of the same input (query, key, value) into one matmul.
  Encoders, which run many tokens through the same small weights again and again, use it, with tokens as
  columns (``linear_t``, ``layer_norm_t``); ``dense`` is the same with tokens as rows.

In ``decoding`` (a decoder's token-by-token loop), a matrix of PARALLEL_MIN_WEIGHTS or more multiplying at most
DECODE_TOKENS rows of x is cast and multiplied half on the calling thread and half on one helper thread, each on its
own 4 MiB tile, with OpenBLAS on one thread: numpy's cast and BLAS release the GIL. ``decoding(threads=1)`` turns
it off.

State: float32 copies belong to the ``FloatWeightCache`` a caller passes (the runtime keeps one per model); thread
counts are arguments. What is process-wide is what the process has once: the helper thread, each thread's scratch
tiles, and the BLAS library's thread count, which ``decoding`` blocks in any thread share (counted under a lock).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import UsageError

log = logging.getLogger(__name__)

DECODE_TOKENS = 16  # at or below this many rows of x, casting the weights is the cost: 1 MiB tiles
TILE_ELEMENTS = 1 << 18  # 1 MiB of float32 per cast tile: on 2048-wide decode calls 4.3 G int8 weights/s, vs 3.2 at 128 KiB
PREFILL_TILE_ELEMENTS = 1 << 20  # 4 MiB for longer inputs (4096x4096, 64 tokens: 20 ms, vs 30 ms with 1 MiB tiles)
FLOAT_WEIGHT_BUDGET_CAP_BYTES = 512 << 20

PARALLEL_MIN_WEIGHTS = 1 << 22  # an int8 matrix this large is cast on two threads at decode (smaller: the hand-off costs more)
PARALLEL_TILE_ELEMENTS = 1 << 20  # 4 MiB of float32 per thread there: a quarter of the calls per matrix of 1 MiB tiles

DEFAULT_DECODE_THREADS = min(2, os.cpu_count() or 1)

_scratch = threading.local()
_helper: concurrent.futures.ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_blocks = 0  # ``decoding`` blocks open in any thread: BLAS is on one thread while there are any
_blas_saved: list[tuple[Any, int]] = []  # each BLAS library and the thread count the first of those blocks found
_split = threading.local()  # .on: this thread is in ``decoding``


def _helper_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-decode")
        return _helper


def _blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of every BLAS loaded now (numpy's OpenBLAS; scipy brings its own copy): ~1 ms, so
    looked up when the first ``decoding`` block starts, not per matrix; empty where threadpoolctl finds none."""
    from threadpoolctl import ThreadpoolController

    libraries = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    if not libraries:
        log.info("no BLAS library found to set to one thread: decode casts on one thread")
    return libraries


@contextlib.contextmanager
def decoding(threads: int = DEFAULT_DECODE_THREADS) -> Iterator[None]:
    """Decode on two threads: within the block, on this thread, ``linear`` and ``linear_t`` cast and multiply a large
    int8 matrix (few tokens) half on a helper thread, each thread on its own 4 MiB tile, with BLAS on one thread.

    OpenBLAS's own pool beside our two threads competes with them for the two cores (its waiting threads spin), and
    turning it off and on per matrix made decode erratic, so every loaded BLAS is on one thread while any thread is in
    a ``decoding`` block (process-wide: another thread's BLAS call meanwhile runs on one thread too); the last block
    to end gives back the thread counts the first one found. Without a BLAS library threadpoolctl can set, and with
    ``threads=1``, decode runs on one thread.

    Raises:
        UsageError: ``threads`` is not 1 or 2.
    """
    global _blas_blocks, _blas_saved
    if threads not in (1, 2):
        raise UsageError(f"decode threads must be 1 or 2, got {threads}")
    if threads < 2 or _splitting():
        yield
        return
    with _blas_lock:
        if _blas_blocks == 0:
            libraries = _blas_libraries()
            _blas_saved = [(library, library.get_num_threads()) for library in libraries]
            _set_blas_threads([(library, 1) for library in libraries])
        splitting = bool(_blas_saved)  # nothing to set: BLAS's own pool would compete with a split
        _blas_blocks += splitting
    if not splitting:
        yield
        return
    _split.on = True
    try:
        yield
    finally:
        _split.on = False
        with _blas_lock:
            _blas_blocks -= 1
            if _blas_blocks == 0:
                _set_blas_threads(_blas_saved)


def _set_blas_threads(settings: list[tuple[Any, int]]) -> None:
    """Set each BLAS library's thread count, always from the one long-lived helper thread: OpenBLAS (0.3.30 and 0.3.31
    here) ignored a count raised from another thread than the one that lowered it while that thread lived, which left
    BLAS on one thread when two ``decoding`` blocks in two threads ended in the other order."""

    def set_all() -> None:
        for library, threads in settings:
            library.set_num_threads(threads)

    if settings:
        _helper_thread().submit(set_all).result()


def _splitting() -> bool:
    return getattr(_split, "on", False)


def _splits(tokens: int, weight: np.ndarray) -> bool:
    """Whether ``linear_t`` casts and multiplies this int8 matrix on two threads (in ``decoding``, few tokens, large)."""
    return _splitting() and tokens <= DECODE_TOKENS and weight.size >= PARALLEL_MIN_WEIGHTS


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
    elif _splits(x.shape[0], weight):
        return np.ascontiguousarray(linear_t(x.T, weight, scales, bias).T)  # a decode head: cast on two threads
    else:
        out_features, in_features = weight.shape
        tokens = x.shape[0]
        elements = TILE_ELEMENTS if tokens <= DECODE_TOKENS else PREFILL_TILE_ELEMENTS
        rows = min(out_features, max(8, elements // max(1, in_features)))
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


def linear_t(
    xt: np.ndarray, weight: np.ndarray, scales: np.ndarray | None = None, bias: np.ndarray | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """``linear`` with tokens as columns: y^T = (weight * scales[:, None]) @ x^T + bias[:, None].

    The weight's rows are the output's rows, so an int8 tile cast to float32 multiplies straight into a
    contiguous block of the output; for few tokens OpenBLAS also splits (out, in) @ (in, T) across its threads
    better than (T, in) @ (in, out) (MiniLM shapes, 19 tokens: 1.3-1.6x faster, tools/bench_runtime.py).

    Args:
        xt: (in, T) float32, any strides.
        weight: (out, in) int8 with per-row ``scales`` (out,), or float32/float16 with scales None.
        bias: (out,) or None.
        out: (out, T) float32 to write into, or None.

    Returns:
        (out, T) float32.
    """
    out_features, in_features = weight.shape
    tokens = xt.shape[1]
    if out is None:
        out = np.empty((out_features, tokens), dtype=np.float32)
    if weight.dtype != np.int8:
        np.matmul(weight.astype(np.float32, copy=False), xt, out=out)
    else:
        elements = TILE_ELEMENTS if tokens <= DECODE_TOKENS else PREFILL_TILE_ELEMENTS
        rows = min(out_features, max(8, elements // max(1, in_features)))

        def cast_and_multiply(first: int, end: int) -> None:  # rows [first, end), a tile at a time, on this thread's tile
            tile = _tile_buffer(rows * in_features)
            for start in range(first, end, rows):
                stop = min(end, start + rows)
                w = tile[: (stop - start) * in_features].reshape(stop - start, in_features)
                np.copyto(w, weight[start:stop], casting="unsafe")  # int8 -> float32, exact
                np.matmul(w, xt, out=out[start:stop])

        if _splits(tokens, weight):
            # decode: the cast bounds it, and numpy casts and multiplies without the GIL: half the rows on the helper,
            # each thread on its own larger tile (BLAS is on one thread in ``decoding``)
            rows = min(out_features, max(8, PARALLEL_TILE_ELEMENTS // max(1, in_features)))
            middle = -(-out_features // 2 // rows) * rows
            other_half = _helper_thread().submit(cast_and_multiply, middle, out_features)
            try:
                cast_and_multiply(0, middle)
            finally:
                other_half.result()
        else:
            cast_and_multiply(0, out_features)
    if scales is not None:
        out *= scales[:, None]
    if bias is not None:
        out += bias[:, None]
    return out


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


def dense(x: np.ndarray, projections: Sequence[Projection], *, float_weights: FloatWeightCache | None = None) -> np.ndarray:
    """The projections of x (T, in) side by side, (T, sum of outs): ``dense_t`` on x^T, transposed back (a view)."""
    return dense_t(x.T, projections, float_weights=float_weights).T


def dense_t(xt: np.ndarray, projections: Sequence[Projection], *, float_weights: FloatWeightCache | None = None) -> np.ndarray:
    """The projections of xt (in, T) stacked, (sum of outs, T): one sgemm on float32 copies from ``float_weights`` when
    it has or makes them (None: int8 only), else ``linear_t`` per projection on the int8 weights, each into its rows."""
    usable = float_weights is not None and all(w.dtype == np.int8 for w, _, _ in projections)
    cached = float_weights.get(projections) if usable and float_weights is not None else None
    if cached is not None:
        y = cached.matrix @ xt
        if cached.bias is not None:
            y += cached.bias[:, None]
        return y
    if len(projections) == 1:
        return linear_t(xt, *projections[0])
    y = np.empty((sum(weight.shape[0] for weight, _, _ in projections), xt.shape[1]), dtype=np.float32)
    start = 0
    for weight, scales, bias in projections:
        linear_t(xt, weight, scales, bias, out=y[start : start + weight.shape[0]])
        start += weight.shape[0]
    return y


def embedding(ids: np.ndarray, table: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Rows of an (int8 or float) embedding table, as float32: (..., hidden)."""
    return embedding_rows(table[ids], None if scales is None else scales[ids])


def embedding_rows(rows: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """Gathered rows of an embedding table (``Model.rows``) as float32: (..., hidden)."""
    values = rows.astype(np.float32)
    if scales is not None:
        values *= scales[..., None]
    return values


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm over the last axis; ``out`` may be ``x`` (in place)."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = np.subtract(x, mean, out=out)
    variance = np.einsum("...i,...i->...", centered, centered)[..., None]
    variance *= 1.0 / x.shape[-1]
    variance += eps
    np.sqrt(variance, out=variance)
    centered /= variance
    centered *= weight
    centered += bias
    return centered


@functools.lru_cache(maxsize=8)
def _averaging_row(size: int) -> np.ndarray:
    """(size,) of 1/size, read-only: made once per width, not once per norm."""
    row = np.full(size, 1.0 / size, dtype=np.float32)
    row.flags.writeable = False
    return row


def layer_norm_t(xt: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """LayerNorm over axis 0 of (H, T), tokens as columns; ``out`` may be ``xt`` (in place)."""
    average = _averaging_row(xt.shape[0])  # (H,): the column means as one sgemv
    mean = average @ xt  # (T,); for 19 tokens 5x faster than xt.sum(axis=0), which reduces across rows
    centered = np.subtract(xt, mean, out=out)
    variance = average @ np.square(centered)  # (T,)
    variance += eps
    np.sqrt(variance, out=variance)
    np.reciprocal(variance, out=variance)
    centered *= variance
    centered *= weight[:, None]
    centered += bias[:, None]
    return centered


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), within 4.8e-4 of the exact one;
    ``out`` may be ``x``.

    Computed as x / (1 + exp(-2 sqrt(2/pi) (x + 0.044715 x^3))), the same function (0.5 (1 + tanh u) is the logistic
    of 2u): numpy's float32 exp is faster than its tanh, and the form needs one temporary and seven passes.
    exp overflows to inf for x below about -9.7, where the quotient is -0.0, GELU's limit.
    """
    t = np.multiply(x, x)
    t *= -2.0 * _SQRT_2_OVER_PI * 0.044715
    t -= 2.0 * _SQRT_2_OVER_PI
    t *= x
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += 1.0
    return np.divide(x, t, out=out)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray, axis: int = -1, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over ``axis``; ``out`` may be ``x`` (in place)."""
    shifted = np.subtract(x, x.max(axis=axis, keepdims=True), out=out)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=axis, keepdims=True)
    return shifted
