"""Multiplying by int8 weights as stored: a tile of rows cast to float32 at a time, then BLAS (``linear``, ``linear_t``).

They keep weights int8: each casts them to float32 a tile of rows at a time into a small reused buffer and lets BLAS
do the rest, then scales the output columns by the per-row scales. They read 4x fewer bytes than float32 weights,
but numpy's int8 -> float32 cast (5-8 G weights/s on one core), not memory, bounds them. Decode (``DecodeThreads``) casts
on two threads: a Llama with 0.74 G weights then reads its int8 weights at 8-9 G weights/s, against float32 weights
streaming at the memory's 30 GB/s, 7.5 G weights/s (tools/bench_runtime.py --only-large). Both measured in
tools/bench_runtime.py and tools/bench_embed.py.

State: none of its own. The float32 buffer tiles are cast into is a ``CastTiles`` the caller owns and passes
(``tiles=``: a ``DecoderRunner`` keeps one for its generation, an encoder's pass one for the pass; without one a call
casts into a buffer of its own, freed when it returns); a decode's split is the run's ``decode_threads.DecodeThreads``
(``split=``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .decode_threads import DecodeThreads

DECODE_TOKENS = 16  # at or below this many rows of x, casting the weights is the cost: 1 MiB tiles
TILE_ELEMENTS = 1 << 18  # 1 MiB of float32 per cast tile: on 2048-wide decode calls 4.3 G int8 weights/s, vs 3.2 at 128 KiB
PREFILL_TILE_ELEMENTS = 1 << 20  # 4 MiB for longer inputs (4096x4096, 64 tokens: 20 ms, vs 30 ms with 1 MiB tiles)


class CastTiles:
    """The float32 buffer int8 weights are cast into, a tile of rows at a time, reused from call to call: owned by one
    run's computation and used by one thread at a time. It grows to the largest tile asked for (at most 4 MiB at the
    tile sizes here, more only for a matrix wider than an eighth of a tile) and is freed with its owner or by ``release``.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None

    def take(self, elements: int) -> np.ndarray:
        """A float32 buffer of at least ``elements`` values (its contents are garbage)."""
        buffer = self._buffer
        if buffer is None or buffer.size < elements:
            buffer = self._buffer = np.empty(elements, dtype=np.float32)
        return buffer

    @property
    def size_bytes(self) -> int:
        return 0 if self._buffer is None else self._buffer.nbytes

    def release(self) -> None:
        """Free the buffer (the next ``take`` allocates again)."""
        self._buffer = None


def _tile_rows(weight: np.ndarray, tokens: int, elements: int | None = None) -> int:
    """Rows of ``weight`` per cast tile: about ``elements`` float32 (default: by the number of tokens), at least 8."""
    if elements is None:
        elements = TILE_ELEMENTS if tokens <= DECODE_TOKENS else PREFILL_TILE_ELEMENTS
    out_features, in_features = weight.shape
    return min(out_features, max(8, elements // max(1, in_features)))


def linear(
    x: np.ndarray,
    weight: np.ndarray,
    scales: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    tiles: CastTiles | None = None,
    split: DecodeThreads | None = None,
) -> np.ndarray:
    """y = x @ (weight * scales[:, None]).T + bias, with weight int8 (out, in) or float (out, in).

    Args:
        x: (T, in) float32.
        weight: (out, in) int8 with per-row ``scales`` (out,), or float32/float16 with scales None.
        bias: (out,) or None.
        tiles: the caller's cast buffer (None: one for this call).
        split: an open ``DecodeThreads``: a large matrix at decode is cast on its two threads.

    Returns:
        (T, out) float32.
    """
    if weight.dtype != np.int8:
        y = x @ weight.astype(np.float32, copy=False).T
    elif split is not None and split.splits(x.shape[0], weight):
        return np.ascontiguousarray(linear_t(x.T, weight, scales, bias, tiles=tiles, split=split).T)  # a decode head: two threads
    else:
        out_features, in_features = weight.shape
        tokens = x.shape[0]
        rows = _tile_rows(weight, tokens)
        tile = (tiles or CastTiles()).take(rows * in_features)
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
    xt: np.ndarray,
    weight: np.ndarray,
    scales: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    out: np.ndarray | None = None,
    *,
    tiles: CastTiles | None = None,
    split: DecodeThreads | None = None,
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
        tiles: the caller's cast buffer (None: one for this call).
        split: an open ``DecodeThreads``: a large matrix at decode is cast half on its helper thread.

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
        rows = _tile_rows(weight, tokens)
        tiles = tiles or CastTiles()

        def cast_and_multiply(first: int, end: int, own: CastTiles) -> None:  # rows [first, end), a tile at a time, on ``own``
            tile = own.take(rows * in_features)
            for start in range(first, end, rows):
                stop = min(end, start + rows)
                w = tile[: (stop - start) * in_features].reshape(stop - start, in_features)
                np.copyto(w, weight[start:stop], casting="unsafe")  # int8 -> float32, exact
                np.matmul(w, xt, out=out[start:stop])

        if split is not None and split.splits(tokens, weight):
            # decode: the cast bounds it, and numpy casts and multiplies without the GIL: half the rows on the helper,
            # each thread on its own larger tile (BLAS is on one thread while ``split`` is open)
            rows = _tile_rows(weight, tokens, split.tile_elements)
            middle = -(-out_features // 2 // rows) * rows
            other_half = split.submit(cast_and_multiply, middle, out_features, split.helper_tiles)
            try:
                cast_and_multiply(0, middle, tiles)
            finally:
                other_half.result()
        else:
            cast_and_multiply(0, out_features, tiles)
    if scales is not None:
        out *= scales[:, None]
    if bias is not None:
        out += bias[:, None]
    return out
