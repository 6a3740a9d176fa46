"""Convert a Hugging Face model (folder or .safetensors file) into a .slm file.

The pipeline reads top to bottom: find the source's files, normalise its
config, check every tensor the runtime needs is there with the right shape,
then stream each tensor a block of rows at a time (``ROW_BLOCK_BYTES``) from the
source through the quantizer into ``ModelWriter``, layer by layer in execution
order (``write_tensor`` writes one tensor's chunks).

Memory: one block of rows and its quantization temporaries (about 5x the block),
the writer's chunks in flight, and every int8 matrix's per-row scales of the open
layer (4 bytes a row): bounded by the widest tensor, not by the model. Source
pages read and output pages written are dropped from the page cache as the
conversion goes, so a memory cgroup's page cache does not fill either. The row
table (token embeddings) is read twice: once for its scales, which layer 0
holds, and once for its rows, which come last.

A progressive conversion calibrates on every quantized step at once: the caller
passes the calibrator (``streamload.calibrate.CalibratedShifts``, which runs the
runtime; this package imports nothing of the client). The quantized steps are
spilled to a temporary file beside the output and handed to it as memory maps,
whose clean pages the kernel reclaims under memory pressure.

Threads: the caller's, plus the writer's compression pool.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import mmap
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConversionError, FormatError, SourceError, UsageError
from .architectures import ROW_TABLE_LAYER_NAME, Architecture, find_architecture, layer_names
from .constants import DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_ZSTD_LEVEL, DType, LayerKind, QuantScheme, rows_per_chunk
from .delta import BaseScales, DeltaReport, write_delta
from .manifest import Manifest
from .page_cache import PageReleasingFile, drop_cached
from .quantize import NO_ERROR, QuantizationReport, int8_row_scales, quantize_row_block
from .safetensors_source import FLOAT_DTYPES, SafetensorsCollection
from .tokenizer_import import read_tokenizer
from .writer import ModelWriter

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("int8", "none")

ROW_BLOCK_BYTES = 8 << 20
"""float32 bytes of the rows read, quantized and written at a time (at least one row): the quantizer's temporaries are
about five times this, so a conversion's working set is some 50 MiB plus the widest row, whatever the model."""


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSource:
    """The files that make up one source model."""

    weights: tuple[Path, ...]
    hf_config: Mapping[str, Any]
    tokenizer_json: bytes | None
    extras: Mapping[str, Any]  # sentence-transformers pooling / normalisation, when present


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from None


def _sentence_transformers_extras(folder: Path) -> dict[str, Any]:
    extras: dict[str, Any] = {}
    pooling_file = folder / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        pooling = _read_json(pooling_file)
        for mode in ("mean", "cls", "max"):
            key = "pooling_mode_mean_tokens" if mode == "mean" else f"pooling_mode_{mode}_token" + ("s" if mode == "max" else "")
            if pooling.get(key):
                extras["pooling"] = mode
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        extras["normalize"] = any("Normalize" in str(m.get("type", "")) for m in modules if isinstance(m, dict))
    bert_config = folder / "sentence_bert_config.json"
    if bert_config.is_file():
        max_len = _read_json(bert_config).get("max_seq_length")
        if isinstance(max_len, int) and max_len > 0:
            extras["max_seq_length"] = max_len
    return extras


def _chat_template_extras(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json's chat template and the special tokens it names, for the manifest's config (a chat client
    renders it); a template that is a list of named templates keeps the one named "default"."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    tokenizer_config = _read_json(path)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        return {}
    tokens = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokenizer_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value  # an AddedToken as transformers saves it
        if isinstance(value, str):
            tokens[key] = value
    return {"chat_template": template, "chat_special_tokens": tokens}


def find_source(path: str | os.PathLike[str], *, config_path: str | os.PathLike[str] | None = None) -> ModelSource:
    """Locate weights, config and tokenizer for a folder or a single .safetensors file.

    Raises:
        SourceError: with what is missing and how to supply it.
    """
    path = Path(path)
    if path.is_dir():
        folder = path
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise SourceError(f"{index}: no weight_map")
            weights = tuple(folder / name for name in sorted(set(weight_map.values())))
        elif (folder / "model.safetensors").is_file():
            weights = (folder / "model.safetensors",)
        else:
            weights = tuple(sorted(folder.glob("*.safetensors")))
        if not weights:
            raise SourceError(
                f"{folder} holds no .safetensors weights (model.safetensors or a sharded index); "
                "convert PyTorch .bin checkpoints to safetensors first"
            )
        for w in weights:
            if not w.is_file():
                raise SourceError(f"shard {w.name} named by the index is missing from {folder}")
    elif path.is_file() and path.suffix == ".safetensors":
        folder, weights = path.parent, (path,)
    elif not path.exists():
        raise SourceError(f"{path}: no such file or folder (give a Hugging Face model folder or a .safetensors file)")
    else:
        raise SourceError(f"{path} is neither a model folder nor a .safetensors file")
    hf_config: Any = None
    if config_path is not None:
        hf_config = _read_json(Path(config_path))
    elif (folder / "config.json").is_file():
        hf_config = _read_json(folder / "config.json")
    else:
        metadata = SafetensorsCollection(weights).files[0].metadata
        if "config" in metadata:
            try:
                hf_config = json.loads(metadata["config"])
            except ValueError:
                raise SourceError(f"{weights[0]}: __metadata__.config is not JSON") from None
    if not isinstance(hf_config, dict):
        raise SourceError(f"no config.json for {path}: put it beside the weights or pass --config PATH")
    return ModelSource(
        weights=weights,
        hf_config=hf_config,
        tokenizer_json=read_tokenizer(folder),  # tokenizer.json, or converted from vocab.json + merges.txt / tokenizer.model
        extras=_sentence_transformers_extras(folder) | _chat_template_extras(folder),
    )


SourcePlan = list[list[tuple[str, str]]]
"""Per execution step, (source name, stored name) of its tensors: int8-bound matrices first, then by name."""


def _plan_layers(arch: Architecture, config: Mapping[str, Any], tensors: SafetensorsCollection) -> SourcePlan:
    """Source tensor names grouped by layer, each group int8-bound matrices first, then by name."""
    blocks = config["num_hidden_layers"]
    plan: SourcePlan = [[] for _ in range(blocks + 2)]
    canonical: dict[str, str] = {}
    for source_name in tensors.names():
        name = arch.canonical_name(source_name)
        if name is None:
            continue
        if tensors.dtype_of(source_name) not in FLOAT_DTYPES:
            logger.info("skipping non-float tensor %s (%s)", source_name, tensors.dtype_of(source_name))
            continue
        canonical[name] = source_name
    expected = arch.expected_shapes(config)
    if arch.decoder is not None and arch.decoder.lm_head not in expected:
        canonical.pop(arch.decoder.lm_head, None)  # tied: the head reads the embedding table
    for name, shape in expected.items():
        if name not in canonical:
            raise SourceError(f"tensor {name!r} is missing from the weights; the files do not match config.json")
        actual = tuple(tensors.shape_of(canonical[name]))[:: -1 if arch.source_transposed(name) else 1]
        if actual != shape:
            raise SourceError(f"tensor {name!r} has shape {tuple(actual)}, config.json implies {shape}")
    for name in sorted(canonical):
        plan[arch.layer_of(name, blocks)].append((canonical[name], name))
    for group in plan:
        group.sort(key=lambda entry: (len(tensors.shape_of(entry[0])) != 2, entry[1]))
    return plan


StoredPair = tuple[np.ndarray, np.ndarray | None]  # int8 values and their per-row scales, or float values and None
ShiftChooser = Callable[[Sequence[Mapping[str, StoredPair]], StoredPair], Sequence[Mapping[str, int]]]
"""``(per step {name: (stored values, scales or None)}, the token table's (values, scales)) -> per step {name:
coarse_shift}`` for the int8 matrices that should be progressive; called once, with every step quantized (the int8
values as read-only memory maps)."""
Calibrator = Callable[[str, Mapping[str, Any], "bytes | None"], ShiftChooser]
"""``(architecture name, the normalised config, the tokenizer JSON or None) -> ShiftChooser``: what a progressive
conversion needs from its caller (``streamload.calibrate.CalibratedShifts`` is one)."""


def _take_row_table(arch: Architecture, plan: SourcePlan) -> tuple[str, str]:
    """Remove the architecture's row table from layer 0's plan: (source name, stored name)."""
    for entry in plan[0]:
        if entry[1] == arch.row_table:
            plan[0].remove(entry)
            return entry
    raise SourceError(f"tensor {arch.row_table!r} is missing from the weights")  # pragma: no cover - _plan_layers checked it


def _check_runnable(arch: Architecture, manifest: Manifest) -> None:
    """The runtime's load-time check, on the manifest about to be written: never write a file it would refuse."""
    try:
        arch.validate(manifest.config, manifest)
    except FormatError as exc:
        raise SourceError(f"the converted model would not load: {exc}") from None


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
                raise SourceError(f"tensor {source_name!r}: {exc}") from None

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
                raise SourceError(f"tensor {source_name!r}: {exc}") from None
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


@dataclasses.dataclass(frozen=True, slots=True)
class _RowTable:
    """The token table: where it comes from, its stored name, and its scales when int8 (written in layer 0)."""

    source_name: str
    name: str
    scales: np.ndarray | None


def _write_step(
    writer: ModelWriter,
    streamer: TensorStreamer,
    layer_name: str,
    group: list[tuple[str, str]],
    *,
    table: _RowTable,
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
    writer: ModelWriter, streamer: TensorStreamer, table: _RowTable, chunk_size_bytes: int, reports: list[TensorReport]
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


class _QuantizedSteps:
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


def _write_progressive_steps(
    writer: ModelWriter,
    streamer: TensorStreamer,
    plan: SourcePlan,
    table: _RowTable,
    choose_shifts: ShiftChooser,
    reports: list[TensorReport],
) -> None:
    """Every step quantized into a spill for the chooser (the shifts depend on the whole model), then every step
    written from the source again, quantized the same way, with the shifts it chose."""
    spill = _QuantizedSteps(writer.path.with_name(writer.path.name + ".steps.tmp"))
    try:
        for group in plan:
            spill.add_step(streamer, group)
        spill.add_step(streamer, [(table.source_name, table.name)])
        *steps, table_step = spill.mapped()
        shifts = choose_shifts(steps, table_step[table.name])
        writer.preview_cosine = getattr(choose_shifts, "preview_cosine", None)
    finally:
        spill.close()
    for layer_name, group, step_shifts in zip(layer_names(len(plan) - 2), plan, shifts, strict=True):
        _write_step(writer, streamer, layer_name, group, table=table, shifts=step_shifts, reports=reports)


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
    table_source, table_name = _take_row_table(arch, plan)
    int8_table = streamer.is_int8(table_source)
    if int8_table:
        streamer.source_bytes_to_read += streamer.tensors.size_bytes_of(table_source)  # read once more, for its scales
    if choose_shifts is not None:
        streamer.source_bytes_to_read += streamer.tensors.size_bytes  # read once more, for calibration
    table = _RowTable(table_source, table_name, streamer.scales_of(table_source, table_name) if int8_table else None)
    if choose_shifts is not None:
        _write_progressive_steps(writer, streamer, plan, table, choose_shifts, reports)
    else:
        for layer_name, group in zip(layer_names(len(plan) - 2), plan, strict=True):
            _write_step(writer, streamer, layer_name, group, table=table, shifts={}, reports=reports)
    _write_row_table(writer, streamer, table, chunk_size_bytes, reports)
    return reports


def _check_arguments(quant: str, progressive: bool, calibrator: Calibrator | None) -> None:
    if quant not in QUANT_CHOICES:
        raise UsageError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if progressive and quant == "int8" and calibrator is None:
        raise UsageError("a progressive conversion needs a calibrator (streamload.calibrate.CalibratedShifts)")


def _read_source(
    source: str | os.PathLike[str], config_path: str | os.PathLike[str] | None, quant: str
) -> tuple[ModelSource, Architecture, dict[str, Any], SafetensorsCollection]:
    """The source's files, its architecture, its normalised config (checked against the runtime's bounds), its tensors."""
    model = find_source(source, config_path=config_path)
    arch = find_architecture(model.hf_config)
    config = arch.normalize_config(model.hf_config, model.extras)
    config["quantization"] = quant
    config.update({key: model.extras[key] for key in ("chat_template", "chat_special_tokens") if key in model.extras})
    try:
        arch.read_config(config)  # the runtime's bounds, before any work
    except FormatError as exc:
        raise SourceError(f"config.json: {exc}") from None
    return model, arch, config, SafetensorsCollection(model.weights)


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
        SourceError, UnsupportedArchitectureError: the source cannot be converted.
        UsageError: ``quant`` is not one of QUANT_CHOICES, or ``progressive`` without a ``calibrator``.

    Example:
        >>> report = convert("all-MiniLM-L6-v2/", "minilm.slm")   # doctest: +SKIP
        >>> report.output_size_bytes / report.source_size_bytes  # doctest: +SKIP
        0.23
    """
    _check_arguments(quant, progressive, calibrator)
    started = time.perf_counter()
    model, arch, config, tensors = _read_source(source, config_path, quant)
    plan = _plan_layers(arch, config, tensors)
    if base is not None and Path(base).resolve() == Path(output).resolve():
        raise SourceError(f"{output} is the base too: write the new version to another file, the old one stays for its clients")
    base_scales = BaseScales(base) if base is not None and quant == "int8" else None
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
        from .reader import ModelReader

        with ModelReader(output) as written:
            manifest = written.manifest  # it lists the delta now
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
