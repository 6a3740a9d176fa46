"""A progressive conversion's calibration: every step quantized into a spill, the caller's chooser picks the shifts.

The coarse_shift of each int8 matrix depends on the whole model, so before any step is written every step is
quantized (as it will be written) into ``QuantizedSteps``: int8 values spilled to a temporary file beside the output
and handed to the chooser as read-only memory maps, whose clean pages the kernel reclaims under memory pressure;
scales and floats in memory. ``choose_shifts_for_steps`` returns the shifts; the converter then writes every step
from the source again. The chooser comes from the caller's ``Calibrator`` (``streamload.calibrate.CalibratedShifts``,
which runs the runtime; this package imports nothing of the client). Threads: the caller's.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .convert_plan import RowTable, SourcePlan
from .page_cache import PageReleasingFile, drop_cached
from .tensor_streamer import TensorStreamer
from .writer import ModelWriter

StoredPair = tuple[np.ndarray, np.ndarray | None]  # int8 values and their per-row scales, or float values and None


@dataclasses.dataclass(frozen=True, slots=True)
class ShiftChoice:
    """What a ``ShiftChooser`` picked, and what it measured of the result."""

    shifts: Sequence[Mapping[str, int]]  # per step, {name: coarse_shift} for the int8 matrices that should be progressive
    preview_cosine: float | None = None  # the coarse model's mean cosine to the exact one on the calibration input, if run


ShiftChooser = Callable[[Sequence[Mapping[str, StoredPair]], StoredPair], ShiftChoice]
"""``(per step {name: (stored values, scales or None)}, the token table's (values, scales)) -> ShiftChoice``; called
once, with every step quantized (the int8 values as read-only memory maps)."""
Calibrator = Callable[[str, Mapping[str, Any], "bytes | None"], ShiftChooser]
"""``(architecture name, the normalised config, the tokenizer JSON or None) -> ShiftChooser``: what a progressive
conversion needs from its caller (``streamload.calibrate.CalibratedShifts`` is one)."""


class QuantizedSteps:
    """Every step quantized, for a ShiftChooser: int8 values in a temporary file, mapped read-only; scales and
    floats in memory. The file is unlinked on ``close``; the chooser may keep its views (the mapping lives on)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._spill = PageReleasingFile(path, "w+b")
        self._pending: list[dict[str, tuple[int, tuple[int, ...], Any]]] = []  # name -> (offset, shape, scales or floats)
        self._map: mmap.mmap | None = None

    def add_step(self, streamer: TensorStreamer, group: Sequence[tuple[str, str]]) -> None:
        step = {}
        for source_name, name in group:
            streamer.report_progress()
            step[name] = self._add(streamer, source_name, name)
        self._pending.append(step)

    def _add(self, streamer: TensorStreamer, source_name: str, name: str) -> tuple[int, tuple[int, ...], Any]:
        shape = streamer.shape_of(source_name)
        if not streamer.is_int8(source_name):
            dtype = streamer.float_dtype(source_name).numpy_name
            values = [np.asarray(block, dtype=dtype).reshape(-1) for block in streamer.row_blocks(source_name)]
            return -1, shape, (np.concatenate(values) if values else np.zeros(0, dtype)).reshape(shape)
        offset = self._spill.file.tell()
        scales = []
        for q, block_scales, _ in streamer.quantized_blocks(source_name, name, record=False):
            self._spill.write(memoryview(q).cast("B"))
            scales.append(block_scales)
        return offset, shape, np.concatenate(scales) if scales else np.zeros(0, np.float32)

    def mapped(self) -> list[dict[str, StoredPair]]:
        """Every step added, {name: (values, scales or None)}: int8 values are views of the mapped file."""
        self._spill.release(self._spill.file.tell())
        size = self._spill.file.tell()
        self._map = mmap.mmap(self._spill.file.fileno(), size, access=mmap.ACCESS_READ) if size else None
        steps = []
        for pending in self._pending:
            step: dict[str, StoredPair] = {}
            for name, (offset, shape, held) in pending.items():
                if offset < 0:
                    step[name] = (held, None)
                else:
                    values = np.frombuffer(self._map, np.int8, math.prod(shape), offset) if self._map is not None else np.zeros(0, np.int8)
                    step[name] = (values.reshape(shape), held)
            steps.append(step)
        return steps

    def close(self) -> None:
        """Drop the mapped pages from this process and the page cache, and unlink the file."""
        if self._map is not None and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)
        if not self._spill.file.closed:
            drop_cached(self._spill.file.fileno(), 0, self._spill.file.tell())
            self._spill.file.close()
        self._path.unlink(missing_ok=True)


def choose_shifts_for_steps(
    writer: ModelWriter, streamer: TensorStreamer, plan: SourcePlan, table: RowTable, choose_shifts: ShiftChooser
) -> Sequence[Mapping[str, int]]:
    """Every step (and the row table) quantized into a spill for ``choose_shifts``: per step, {name: coarse_shift}.
    Records the ``preview_cosine`` the chooser measured, if it did, in the writer's stats."""
    spill = QuantizedSteps(writer.path.with_name(writer.path.name + ".steps.tmp"))
    try:
        for group in plan:
            spill.add_step(streamer, group)
        spill.add_step(streamer, [(table.source_name, table.name)])
        *steps, table_step = spill.mapped()
        choice = choose_shifts(steps, table_step[table.name])
        writer.preview_cosine = choice.preview_cosine
    finally:
        spill.close()
    return choice.shifts
