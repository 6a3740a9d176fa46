"""Stream a source tensor a block of rows at a time: read, quantize (with a base's scales, if given), write.

``TensorStreamer`` reads a tensor ``ROW_BLOCK_BYTES`` of float32 at a time from the safetensors source, quantizes each
block to int8 with per-row scales (or keeps it float) and hands it to a ``ModelWriter``, which compresses and writes
it; it counts the source bytes read, for progress. Memory: one block of rows and its quantization temporaries (about
5x the block), plus a matrix's per-row scales (4 bytes a row), returned to the caller. Threads: the caller's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from ..errors import ConversionError, ConversionInputError
from .constants import DType, QuantScheme
from .quantize import NO_ERROR, QuantizationReport, int8_row_scales, quantize_row_block
from .rebase import BaseScales
from .safetensors_source import SafetensorsCollection
from .writer import ModelWriter

ROW_BLOCK_BYTES = 8 << 20
"""float32 bytes of the rows read, quantized and written at a time (at least one row): the quantizer's temporaries are
about five times this, so a conversion's working set is some 50 MiB plus the widest row, whatever the model."""


@dataclasses.dataclass(frozen=True, slots=True)
class Int8Matrix:
    """An int8 matrix as written: its per-row scales (stored later in the layer) and what quantizing it cost."""

    scales: np.ndarray
    report: QuantizationReport


class TensorStreamer:
    """Reads source tensors a block of rows at a time and writes them into a ``ModelWriter`` as ``quant`` says.

    ``write_tensor`` is the one place a tensor's chunks are made: a hook (a delta against a base model, say) wraps
    or replaces it.
    """

    def __init__(
        self,
        tensors: SafetensorsCollection,
        quant: str,
        progress: Callable[[int, int], None] | None,
        transposed: frozenset[str] = frozenset(),
        base: BaseScales | None = None,
    ) -> None:
        self.tensors = tensors
        self.quant = quant
        self.base = base  # a previous version's per-row scales, kept where the error bound allows (``convert(base=...)``)
        self.transposed = transposed  # source names held (in, out), as GPT-2's Conv1D: stored (out, in) like every matrix
        self._progress = progress
        self.source_bytes_done = 0
        self.source_bytes_to_read = tensors.size_bytes  # grows with each extra pass the conversion plans

    def is_int8(self, source_name: str) -> bool:
        """Whether the tensor is stored int8 with per-row scales (every 2-D matrix of an int8 conversion)."""
        return self.quant == "int8" and len(self.tensors.shape_of(source_name)) == 2

    def float_dtype(self, source_name: str) -> DType:
        """Norms and biases become f32 for the runtime; unquantized matrices keep f16 when the source has it."""
        keep_f16 = len(self.tensors.shape_of(source_name)) == 2 and self.tensors.dtype_of(source_name) == "F16"
        return DType.F16 if keep_f16 else DType.F32

    def shape_of(self, source_name: str) -> tuple[int, ...]:
        """The tensor's shape as stored: a transposed source's reversed."""
        shape = tuple(self.tensors.shape_of(source_name))
        return shape[::-1] if source_name in self.transposed else shape

    def row_blocks(self, source_name: str) -> Iterator[np.ndarray]:
        """The tensor's values, ROW_BLOCK_BYTES of float32 at a time (counted in ``source_bytes_done`` as read).

        A transposed source is read whole and transposed (GPT-2's matrices: the largest, 1600 x 6400 in gpt2-xl,
        is 41 MB of float32), then handed out in the same blocks."""
        if source_name in self.transposed:
            whole = np.ascontiguousarray(self.tensors.array(source_name).T)
            per_block = max(1, ROW_BLOCK_BYTES // max(1, 4 * math.prod(whole.shape[1:])))
            for start in range(0, whole.shape[0], per_block):
                stop = min(whole.shape[0], start + per_block)
                yield whole[start:stop]
                self.source_bytes_done += (stop - start) * whole[0].nbytes if whole.ndim > 1 else whole.nbytes
            return
        shape = self.tensors.shape_of(source_name)
        rows = shape[0] if shape else 1
        per_block = max(1, ROW_BLOCK_BYTES // max(1, 4 * math.prod(shape[1:])))
        row_bytes = self.tensors.size_bytes_of(source_name) // max(rows, 1)
        for start in range(0, rows, per_block):
            stop = min(rows, start + per_block)
            yield self.tensors.read_rows(source_name, start, stop)
            self.source_bytes_done += (stop - start) * row_bytes

    def report_progress(self) -> None:
        if self._progress is not None:
            self._progress(self.source_bytes_done, self.source_bytes_to_read)

    def quantized_blocks(
        self, source_name: str, name: str = "", *, record: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, QuantizationReport]]:
        """(int8 rows, their scales, their error) per block of the matrix: with the base's scales where it has the matrix
        ``name`` (``record``: its rebase report is kept for the conversion's summary)."""
        if self.base is not None and name:
            rebased = self.base.quantize_blocks(name, self.shape_of(source_name)[0], self.row_blocks(source_name), record=record)
            if rebased is not None:
                yield from rebased
                return
        for block in self.row_blocks(source_name):
            try:
                yield quantize_row_block(block)
            except ConversionError as exc:
                raise ConversionInputError(f"tensor {source_name!r}: {exc}") from None

    def scales_of(self, source_name: str, name: str = "") -> np.ndarray:
        """A matrix's int8 scales without quantizing it: the row table's scales go to layer 0, its rows last (with a
        base, the scales its rows will be quantized with)."""
        if self.base is not None and name:
            rebased = [block_scales for _, block_scales, _ in self.quantized_blocks(source_name, name, record=False)]
            if rebased:
                return np.concatenate(rebased)
        scales = []
        for block in self.row_blocks(source_name):
            try:
                scales.append(int8_row_scales(block))
            except ConversionError as exc:
                raise ConversionInputError(f"tensor {source_name!r}: {exc}") from None
        return np.concatenate(scales) if scales else np.zeros(0, np.float32)

    def write_tensor(self, writer: ModelWriter, source_name: str, name: str, *, coarse_shift: int | None = None) -> Int8Matrix | None:
        """Write one tensor's values into the writer's open layer: int8 (returns its scales, for the caller to write
        after the layer's int8 matrices) or float (returns None)."""
        shape = self.shape_of(source_name)
        if not self.is_int8(source_name):
            writer.begin_tensor(name, shape, self.float_dtype(source_name))
            for block in self.row_blocks(source_name):
                writer.add_rows(block)
            writer.end_tensor()
            return None
        writer.begin_tensor(name, shape, DType.I8, quant=QuantScheme.INT8_ROW, scales=name + ".scales", coarse_shift=coarse_shift)
        scales, report = [], NO_ERROR
        for q, block_scales, block_report in self.quantized_blocks(source_name, name):
            writer.add_rows(q)
            scales.append(block_scales)
            report = report.merged(block_report)
        writer.end_tensor(report)
        return Int8Matrix(np.concatenate(scales) if scales else np.zeros(0, np.float32), report)
