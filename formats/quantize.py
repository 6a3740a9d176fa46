"""Symmetric int8 quantization with one scale per output row.

Rows are independent: quantizing a matrix block of rows by block of rows (``quantize_row_block``, what the converter
does to stay in bounded memory) gives exactly the bytes and the error of quantizing it whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import ConversionError, UsageError

ROWS_PER_BLOCK = 4096
"""Rows quantized at a time: bounds the float32 temporaries to a few MiB for any matrix."""


@dataclasses.dataclass(frozen=True, slots=True)
class QuantizationReport:
    """What quantizing one tensor cost."""

    max_abs_error: float  # largest |w - q * scale| over the tensor
    max_rel_error: float  # largest over rows of ||w_row - q_row * scale|| / ||w_row||

    def merged(self, other: QuantizationReport) -> QuantizationReport:
        """The report of two row blocks together (both errors are maxima over rows)."""
        return QuantizationReport(max(self.max_abs_error, other.max_abs_error), max(self.max_rel_error, other.max_rel_error))


NO_ERROR = QuantizationReport(max_abs_error=0.0, max_rel_error=0.0)
"""The report of no rows: the start of a merge."""


def quantize_row_block(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, QuantizationReport]:
    """Quantize some rows of a matrix: (q int8 (b, cols), scales float32 (b,), their error).

    Args:
        rows: (b, cols) float16/float32/float64 values (a memory map is fine); made float32 here.

    Raises:
        ConversionError: a value is NaN or infinite.
    """
    block = np.asarray(rows, dtype=np.float32)  # (b, cols)
    if not np.isfinite(block).all():
        raise ConversionError("weight has NaN or infinite values; cannot quantize")
    scale = _scales_of(block)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    qb = np.clip(np.rint(block / safe[:, None]), -127, 127).astype(np.int8)
    max_abs = max_rel = 0.0
    error = block - qb.astype(np.float32) * scale[:, None]  # (b, cols)
    if error.size:
        max_abs = float(np.abs(error).max())
        norms = np.linalg.norm(block, axis=1)
        rel = np.linalg.norm(error, axis=1) / np.where(norms > 0, norms, 1.0)
        max_rel = float(rel.max())
    return qb, scale, QuantizationReport(max_abs_error=max_abs, max_rel_error=max_rel)


def int8_row_scales(rows: np.ndarray) -> np.ndarray:
    """The per-row scales ``quantize_row_block`` gives these rows, without quantizing them (one pass, no temporaries
    of the block's size but its float32 form).

    Raises:
        ConversionError: a value is NaN or infinite.
    """
    scale = _scales_of(np.asarray(rows, dtype=np.float32))
    if not np.isfinite(scale).all():  # a row's max is NaN or infinite exactly when one of its values is
        raise ConversionError("weight has NaN or infinite values; cannot quantize")
    return scale


def _scales_of(block: np.ndarray) -> np.ndarray:
    amax = np.abs(block).max(axis=1) if block.shape[1] else np.zeros(len(block), np.float32)  # (b,)
    return (amax / 127.0).astype(np.float32)


def quantize_int8_rows(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, QuantizationReport]:
    """Quantize a 2-D float matrix to int8 with a per-row scale.

    real[r, :] ~= q[r, :] * scales[r], with scales[r] = max|weight[r, :]| / 127.

    Args:
        weight: (rows, cols) float16/float32 array (a memory map is fine: read block by block).

    Returns:
        (q int8 (rows, cols), scales float32 (rows,), the error introduced).

    Raises:
        UsageError: ``weight`` is not 2-D.
        ConversionError: a value is NaN or infinite.
    """
    if weight.ndim != 2:
        raise UsageError(f"expected a 2-D matrix, got shape {weight.shape}")
    rows, cols = weight.shape
    q = np.empty((rows, cols), dtype=np.int8)
    scales = np.empty(rows, dtype=np.float32)
    report = NO_ERROR
    for start in range(0, rows, ROWS_PER_BLOCK):
        q[start : start + ROWS_PER_BLOCK], scales[start : start + ROWS_PER_BLOCK], block_report = quantize_row_block(
            weight[start : start + ROWS_PER_BLOCK]
        )
        report = report.merged(block_report)
    return q, scales, report


def int8_histogram(q: np.ndarray) -> np.ndarray:
    """Counts of the 256 int8 values (index = value + 128)."""
    counts = np.bincount(q.reshape(-1).view(np.uint8), minlength=256).astype(np.int64)  # index = value mod 256
    return np.roll(counts, 128)  # values -128..-1 (bytes 128..255) first


def entropy_bits_per_symbol(histogram: np.ndarray | list[int] | tuple[int, ...]) -> float:
    """Order-0 (Shannon) entropy of a histogram, in bits per symbol."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


# ---------------------------------------------------------------- progressive tensors (FORMAT.md, "Progressive tensors")


def coarse_levels(q: np.ndarray, shift: int) -> np.ndarray:
    """The coarse level of each int8 value: sign-magnitude rounding to a multiple of 2**shift, with an exact zero.

    level = sign(q) * min((|q| + 2**(shift-1)) >> shift, 127 >> shift) << shift: the centre of q's bucket,
    so dequantizing it with the tensor's scales needs nothing else, and |q| < 2**(shift-1) maps to exactly 0
    (a few input dimensions carry activations 15x the median: an offset on near-zero weights would be amplified).
    Idempotent: ``coarse_levels(coarse_levels(q, s), s) == coarse_levels(q, s)``, and a level never leaves int8.
    """
    levels = np.empty(q.shape, dtype=np.int8)
    values, out = q.reshape(-1), levels.reshape(-1)
    for start in range(0, values.size, LEVELS_BLOCK_ELEMENTS):  # int16 temporaries of a block, not of the tensor
        wide = values[start : start + LEVELS_BLOCK_ELEMENTS].astype(np.int16)
        sign = np.sign(wide)
        np.abs(wide, out=wide)
        wide += 1 << (shift - 1)
        wide >>= shift
        np.minimum(wide, 127 >> shift, out=wide)
        wide <<= shift
        wide *= sign
        out[start : start + LEVELS_BLOCK_ELEMENTS] = wide
    return levels


LEVELS_BLOCK_ELEMENTS = 1 << 20
"""Values per block of ``coarse_levels``: a 32000 x 1024 head made 320 MB of int16 temporaries at once, now 4 MB."""


def split_coarse(q: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse levels, refinement) of int8 values: q == coarse + refinement exactly, both int8."""
    coarse = coarse_levels(q, shift)
    return coarse, (q.astype(np.int16) - coarse).astype(np.int8)


def fold_refinement(stored: np.ndarray, refinement: np.ndarray, shift: int) -> np.ndarray:
    """The exact int8 values from a stored range (coarse levels, or values already folded) and its refinement.

    Idempotent: folding into values that were already folded gives the same values, because the coarse level
    of an exact value is the level it was split from; so a refinement applied twice (a crash between the
    fold and its journal record) does no harm. Values a hostile file makes overflow wrap; they never raise.
    """
    return (coarse_levels(stored, shift).astype(np.int16) + refinement).astype(np.int8)
