"""Convert a Hugging Face model (folder or .safetensors file) into a .slm file.

The pipeline reads top to bottom: find the source's files, normalise its config, check every tensor the runtime needs
is there with the right shape (``convert_plan``), then stream each tensor a block of rows at a time from the source
through the quantizer into ``ModelWriter`` (``tensor_streamer``), layer by layer in execution order: each step's int8
matrices, their scales, its floats; the row table last. With a base, the base's scales are kept where the error bound
allows (``rebase``) and a delta file is written beside the output (``delta``).

Memory: one block of rows and its quantization temporaries (about 5x the block), the writer's chunks in flight, and
every int8 matrix's per-row scales of the open layer (4 bytes a row): bounded by the widest tensor, not by the model.
Source pages read and output pages written are dropped from the page cache as the conversion goes, so a memory
cgroup's page cache does not fill either. The row table (token embeddings) is read twice: once for its scales, which
layer 0 holds, and once for its rows, which come last.

A progressive conversion calibrates on every quantized step at once (``progressive_convert``): the caller passes the
calibrator (``streamload.calibrate.CalibratedShifts``, which runs the runtime; this package imports nothing of the
client); every step is then written from the source again with the shifts it chose.

Threads: the caller's, plus the writer's compression pool.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionInputError, FormatError, UsageError
from .architectures import ROW_TABLE_LAYER_NAME, Architecture, layer_names
from .constants import DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_ZSTD_LEVEL, LayerKind, rows_per_chunk
from .convert_plan import RowTable, SourcePlan, plan_layers, read_source, take_row_table
from .delta import DeltaReport, write_delta
from .manifest import Manifest
from .progressive_convert import Calibrator, ShiftChooser, choose_shifts_for_steps
from .rebase import BaseScales
from .tensor_streamer import TensorStreamer
from .writer import ModelWriter

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("int8", "none")


@dataclasses.dataclass(frozen=True, slots=True)
class TensorReport:
    name: str
    layer_index: int
    shape: tuple[int, ...]
    stored_dtype: str
    max_abs_error: float | None
    max_rel_error: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class ConversionReport:
    """What a conversion produced and what it cost."""

    path: Path
    manifest: Manifest
    source_size_bytes: int
    output_size_bytes: int
    seconds: float
    tensors: tuple[TensorReport, ...]
    rebase: dict[str, Any] | None = None  # with a base: rows that kept its scales, the error against independent quantization
    delta: DeltaReport | None = None  # with a base: the delta file written beside the output (docs/updates.md)

    @property
    def max_abs_error(self) -> float:
        return max((t.max_abs_error or 0.0 for t in self.tensors), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((t.max_rel_error or 0.0 for t in self.tensors), default=0.0)


def _check_runnable(arch: Architecture, manifest: Manifest) -> None:
    """The runtime's load-time check, on the manifest about to be written: never write a file it would refuse."""
    try:
        arch.validate(manifest.config, manifest)
    except FormatError as exc:
        raise ConversionInputError(f"the converted model would not load: {exc}") from None


def _write_step(
    writer: ModelWriter,
    streamer: TensorStreamer,
    layer_name: str,
    group: list[tuple[str, str]],
    *,
    table: RowTable,
    shifts: Mapping[str, int],
    reports: list[TensorReport],
) -> None:
    """One execution step: its int8 matrices, then their scales (and, in layer 0, the row table's), then its floats."""
    layer_index = writer.begin_layer(layer_name)
    deferred_scales: list[tuple[str, np.ndarray]] = []
    if layer_index == 0 and table.scales is not None:
        deferred_scales.append((table.name + ".scales", table.scales))
    for source_name, name in group:
        streamer.report_progress()
        shape = streamer.shape_of(source_name)
        if not streamer.is_int8(source_name):
            for scale_name, scales in deferred_scales:  # floats go after every int8 matrix of the layer
                writer.add_tensor(scale_name, scales)
            deferred_scales.clear()
        written = streamer.write_tensor(writer, source_name, name, coarse_shift=shifts.get(name))
        if written is None:
            reports.append(TensorReport(name, layer_index, shape, np.dtype(streamer.float_dtype(source_name).numpy_name).name, None, None))
        else:
            deferred_scales.append((name + ".scales", written.scales))
            reports.append(TensorReport(name, layer_index, shape, "i8", written.report.max_abs_error, written.report.max_rel_error))
    for scale_name, scales in deferred_scales:
        writer.add_tensor(scale_name, scales)
    writer.end_layer()


def _write_row_table(
    writer: ModelWriter, streamer: TensorStreamer, table: RowTable, chunk_size_bytes: int, reports: list[TensorReport]
) -> None:
    """The token table, after every step, in chunks of whole rows."""
    rows, cols = streamer.tensors.shape_of(table.source_name)
    float_dtype = np.dtype(streamer.float_dtype(table.source_name).numpy_name)
    row_bytes = cols * (1 if table.scales is not None else float_dtype.itemsize)
    row_chunk_bytes = min(chunk_size_bytes, rows_per_chunk(rows, row_bytes) * row_bytes)
    layer_index = writer.begin_layer(ROW_TABLE_LAYER_NAME, kind=LayerKind.ROWS, chunk_size_bytes=max(row_chunk_bytes, 1))
    written = streamer.write_tensor(writer, table.source_name, table.name)
    errors = (None, None) if written is None else (written.report.max_abs_error, written.report.max_rel_error)
    stored_dtype = "int8" if written is not None else float_dtype.name
    reports.append(TensorReport(table.name, layer_index, (rows, cols), stored_dtype, *errors))
    writer.end_layer()


def _write_layers(
    writer: ModelWriter,
    streamer: TensorStreamer,
    arch: Architecture,
    plan: SourcePlan,
    chunk_size_bytes: int,
    choose_shifts: ShiftChooser | None,
) -> list[TensorReport]:
    """Every execution step in order (progressive when ``choose_shifts`` is given), then the row table."""
    reports: list[TensorReport] = []
    table_source, table_name = take_row_table(arch, plan)
    int8_table = streamer.is_int8(table_source)
    if int8_table:
        streamer.source_bytes_to_read += streamer.tensors.size_bytes_of(table_source)  # read once more, for its scales
    if choose_shifts is not None:
        streamer.source_bytes_to_read += streamer.tensors.size_bytes  # read once more, for calibration
    table = RowTable(table_source, table_name, streamer.scales_of(table_source, table_name) if int8_table else None)
    shifts = [{}] * len(plan) if choose_shifts is None else choose_shifts_for_steps(writer, streamer, plan, table, choose_shifts)
    for layer_name, group, step_shifts in zip(layer_names(len(plan) - 2), plan, shifts, strict=True):
        _write_step(writer, streamer, layer_name, group, table=table, shifts=step_shifts, reports=reports)
    _write_row_table(writer, streamer, table, chunk_size_bytes, reports)
    return reports


def _check_arguments(quant: str, progressive: bool, calibrator: Calibrator | None) -> None:
    if quant not in QUANT_CHOICES:
        raise UsageError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if progressive and quant == "int8" and calibrator is None:
        raise UsageError("a progressive conversion needs a calibrator (streamload.calibrate.CalibratedShifts)")


def _read_base_scales(base: str | os.PathLike[str] | None, output: str | os.PathLike[str], quant: str) -> BaseScales | None:
    """The base's per-row scales, for an int8 conversion against a base (``convert(base=...)``)."""
    if base is not None and Path(base).resolve() == Path(output).resolve():
        raise ConversionInputError(f"{output} is the base too: write the new version to another file, the old one stays for its clients")
    return BaseScales(base) if base is not None and quant == "int8" else None


def _read_manifest(path: str | os.PathLike[str]) -> Manifest:
    from .reader import ModelReader

    with ModelReader(path) as written:
        return written.manifest


def convert(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    quant: str = "int8",
    zstd_level: int = DEFAULT_ZSTD_LEVEL,
    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    config_path: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    progressive: bool = False,
    calibrator: Calibrator | None = None,
    base: str | os.PathLike[str] | None = None,
) -> ConversionReport:
    """Convert a model folder or .safetensors file into a .slm file, in memory bounded by its widest tensor's rows.

    Args:
        source: a Hugging Face model folder or a single .safetensors file.
        output: path of the .slm file to write (replaced atomically).
        quant: "int8" (2-D weights to int8 with per-row scales) or "none" (keep float).
        zstd_level: compression level of every chunk.
        chunk_size_bytes: raw bytes per chunk.
        config_path: a config.json to use when the source has none beside it.
        progress: called with (source bytes converted, source bytes in all) before each tensor and at the end.
        progressive: store each int8 matrix of the execution steps as coarse levels plus a refinement
            (FORMAT.md, "Progressive tensors"), so a client can run a preview before the exact weights are in.
        calibrator: makes the ``ShiftChooser`` that picks each matrix's coarse_shift (required when
            ``progressive``): ``streamload.calibrate.CalibratedShifts`` runs the layers on a bundled text.
        base: the .slm file of the previous version: its per-row scales are kept where the error bound allows, and a
            delta file against it is written beside ``output`` and listed in its manifest (``formats/delta.py``).

    Returns:
        A ``ConversionReport`` with per-tensor quantization errors.

    Raises:
        ConversionInputError, UnsupportedArchitectureError: the source cannot be converted (NoConfigError: no config.json).
        UsageError: ``quant`` is not one of QUANT_CHOICES, or ``progressive`` without a ``calibrator``.

    Example:
        >>> report = convert("all-MiniLM-L6-v2/", "minilm.slm")   # doctest: +SKIP
        >>> report.output_size_bytes / report.source_size_bytes  # doctest: +SKIP
        0.23
    """
    _check_arguments(quant, progressive, calibrator)
    started = time.perf_counter()
    model, arch, config, tensors = read_source(source, config_path, quant)
    plan = plan_layers(arch, config, tensors)
    base_scales = _read_base_scales(base, output, quant)
    transposed = frozenset(source_name for group in plan for source_name, name in group if arch.source_transposed(name))
    streamer = TensorStreamer(tensors, quant, progress, transposed, base_scales)
    choose_shifts = calibrator(arch.name, config, model.tokenizer_json) if progressive and quant == "int8" and calibrator else None
    with ModelWriter(
        output,
        config=config,
        tokenizer_json=model.tokenizer_json,
        chunk_size_bytes=chunk_size_bytes,
        zstd_level=zstd_level,
        threads=threads,
    ) as writer:
        reports = _write_layers(writer, streamer, arch, plan, chunk_size_bytes, choose_shifts)
        manifest = writer.finish(check=lambda written: _check_runnable(arch, written))
    if progress is not None:
        progress(streamer.source_bytes_to_read, streamer.source_bytes_to_read)
    delta = write_delta(output, base) if base is not None else None
    if delta is not None and delta.path is not None:
        manifest = _read_manifest(output)  # it lists the delta now
    report = ConversionReport(
        path=Path(output),
        manifest=manifest,
        source_size_bytes=tensors.size_bytes,
        output_size_bytes=Path(output).stat().st_size,
        seconds=time.perf_counter() - started,
        tensors=tuple(reports),
        rebase=base_scales.summary() if base_scales is not None else None,
        delta=delta,
    )
    logger.info(
        "converted %s -> %s: %d -> %d bytes in %.2f s", source, output, report.source_size_bytes, report.output_size_bytes, report.seconds
    )
    return report
