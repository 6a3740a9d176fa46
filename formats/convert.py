"""Convert a Hugging Face model (folder or .safetensors file) into a .slm file.

The pipeline reads top to bottom: find the source's files, normalise its
config, check every tensor the runtime needs is there with the right shape,
then stream tensor by tensor from the source's memory map through the
quantizer into ``ModelWriter``, layer by layer in execution order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, SourceError
from .architectures import ROW_TABLE_LAYER_NAME, Architecture, find_architecture, layer_names
from .constants import DEFAULT_CHUNK_SIZE_BYTES, DEFAULT_ZSTD_LEVEL, LayerKind, QuantScheme, rows_per_chunk
from .manifest import Manifest
from .quantize import QuantizationError, quantize_int8_rows
from .safetensors_source import FLOAT_DTYPES, SafetensorsCollection
from .writer import ModelWriter

logger = logging.getLogger(__name__)

QUANT_CHOICES = ("int8", "none")


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
    tokenizer_file = folder / "tokenizer.json"
    return ModelSource(
        weights=weights,
        hf_config=hf_config,
        tokenizer_json=tokenizer_file.read_bytes() if tokenizer_file.is_file() else None,
        extras=_sentence_transformers_extras(folder) | _chat_template_extras(folder),
    )


def _plan_layers(arch: Architecture, config: Mapping[str, Any], tensors: SafetensorsCollection) -> list[list[str]]:
    """Source tensor names grouped by layer, each group int8-bound matrices first, then by name."""
    blocks = config["num_hidden_layers"]
    plan: list[list[str]] = [[] for _ in range(blocks + 2)]
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
    if arch.name == "llama" and "lm_head.weight" not in expected:
        canonical.pop("lm_head.weight", None)  # tied: the head reads the embedding table
    for name, shape in expected.items():
        if name not in canonical:
            raise SourceError(f"tensor {name!r} is missing from the weights; the files do not match config.json")
        actual = tensors.shape_of(canonical[name])
        if tuple(actual) != shape:
            raise SourceError(f"tensor {name!r} has shape {tuple(actual)}, config.json implies {shape}")
    for name in sorted(canonical):
        plan[arch.layer_of(name, blocks)].append(name)
    for group in plan:
        group.sort(key=lambda n: (len(tensors.shape_of(canonical[n])) != 2, n))
    return [[canonical[n] + "\0" + n for n in group] for group in plan]


@dataclasses.dataclass(frozen=True, slots=True)
class _Stored:
    """A source tensor as it is written: int8 with per-row scales, or float."""

    values: np.ndarray
    scales: np.ndarray | None = None
    error: QuantizationError | None = None

    @property
    def errors(self) -> tuple[float | None, float | None]:
        return (None, None) if self.error is None else (self.error.max_abs_error, self.error.max_rel_error)


StoredPair = tuple[np.ndarray, np.ndarray | None]  # int8 values and their per-row scales, or float values and None
ShiftChooser = Callable[[Sequence[Mapping[str, StoredPair]], StoredPair], Sequence[Mapping[str, int]]]
"""``(per step {name: (stored values, scales or None)}, the token table's (values, scales)) -> per step {name:
coarse_shift}`` for the int8 matrices that should be progressive; called once, with every step quantized."""


def _store_form(values: np.ndarray, quant: str) -> _Stored:
    if quant == "int8" and values.ndim == 2:
        q, scales, error = quantize_int8_rows(values)
        return _Stored(q, scales, error)
    # norms and biases become f32 for the runtime; unquantized matrices keep f16 when the source has it
    keep_f16 = values.ndim == 2 and values.dtype == np.float16
    return _Stored(np.asarray(values, dtype=np.float16 if keep_f16 else np.float32))


def _take_row_table(arch: Architecture, plan: list[list[str]]) -> tuple[str, str]:
    """Remove the architecture's row table from layer 0's plan: (source name, stored name)."""
    for entry in plan[0]:
        source_name, name = entry.split("\0")
        if name == arch.row_table:
            plan[0].remove(entry)
            return source_name, name
    raise SourceError(f"tensor {arch.row_table!r} is missing from the weights")  # pragma: no cover - _plan_layers checked it


def _check_runnable(arch: Architecture, manifest: Manifest) -> None:
    """The runtime's load-time check, on the manifest about to be written: never write a file it would refuse."""
    try:
        arch.validate(manifest.config, manifest)
    except FormatError as exc:
        raise SourceError(f"the converted model would not load: {exc}") from None


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
    choose_shifts: ShiftChooser | None = None,
) -> ConversionReport:
    """Convert a model folder or .safetensors file into a .slm file.

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
        choose_shifts: picks each matrix's coarse_shift, layer by layer (default: ``streamload.calibrate``'s,
            which runs the layers so far on a bundled calibration text).

    Returns:
        A ``ConversionReport`` with per-tensor quantization errors.

    Raises:
        SourceError, UnsupportedArchitectureError: the source cannot be converted.

    Example:
        >>> report = convert("all-MiniLM-L6-v2/", "minilm.slm")   # doctest: +SKIP
        >>> report.output_size_bytes / report.source_size_bytes  # doctest: +SKIP
        0.23
    """
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    started = time.perf_counter()
    model = find_source(source, config_path=config_path)
    arch = find_architecture(model.hf_config)
    config = arch.normalize_config(model.hf_config, model.extras)
    config["quantization"] = quant
    config.update({key: model.extras[key] for key in ("chat_template", "chat_special_tokens") if key in model.extras})
    try:
        arch.read_config(config)  # the runtime's bounds, before any work
    except FormatError as exc:
        raise SourceError(f"config.json: {exc}") from None
    tensors = SafetensorsCollection(model.weights)
    plan = _plan_layers(arch, config, tensors)
    reports: list[TensorReport] = []
    source_bytes_done = 0
    with ModelWriter(
        output,
        config=config,
        tokenizer_json=model.tokenizer_json,
        chunk_size_bytes=chunk_size_bytes,
        zstd_level=zstd_level,
        threads=threads,
    ) as writer:
        if progressive and quant == "int8" and choose_shifts is None:
            from ..calibrate import CalibratedShifts  # runs the runtime: imported only for a progressive conversion

            choose_shifts = CalibratedShifts(arch.name, config, model.tokenizer_json)
        table_source, table_name = _take_row_table(arch, plan)
        table_values = tensors.array(table_source)
        table = _store_form(table_values, quant)  # its scales go to layer 0, its rows after every step
        source_bytes_done += table_values.nbytes

        def quantized(group: list[str]) -> dict[str, _Stored]:
            nonlocal source_bytes_done
            forms = {}
            for entry in group:
                source_name, name = entry.split("\0")
                if progress is not None:
                    progress(source_bytes_done, tensors.size_bytes)
                values = tensors.array(source_name)
                source_bytes_done += values.nbytes
                forms[name] = _store_form(values, quant)
            return forms

        steps: Iterable[tuple[dict[str, _Stored], Mapping[str, int]]]
        if progressive and choose_shifts is not None:  # the shifts depend on the whole model: every step in memory first
            every_step = [quantized(group) for group in plan]
            shifts_of_steps = choose_shifts(
                [{n: (f.values, f.scales) for n, f in forms.items()} for forms in every_step], (table.values, table.scales)
            )
            steps = zip(every_step, shifts_of_steps, strict=True)
            writer.preview_cosine = getattr(choose_shifts, "preview_cosine", None)
        else:  # one step in memory at a time
            steps = ((quantized(group), {}) for group in plan)
        for layer_name, (stored_forms, shifts) in zip(layer_names(config["num_hidden_layers"]), steps, strict=True):
            layer_index = writer.begin_layer(layer_name)
            deferred_scales: list[tuple[str, np.ndarray]] = []
            if layer_index == 0 and table.scales is not None:
                deferred_scales.append((table_name + ".scales", table.scales))
            for name, stored in stored_forms.items():
                if stored.scales is not None:
                    writer.add_tensor(
                        name,
                        stored.values,
                        quant=QuantScheme.INT8_ROW,
                        scales=name + ".scales",
                        error=stored.error,
                        coarse_shift=shifts.get(name),
                    )
                    deferred_scales.append((name + ".scales", stored.scales))
                    reports.append(TensorReport(name, layer_index, stored.values.shape, "i8", *stored.errors))
                    continue
                for scale_name, scales in deferred_scales:  # floats go after every int8 matrix of the layer
                    writer.add_tensor(scale_name, scales)
                deferred_scales.clear()
                writer.add_tensor(name, stored.values)
                reports.append(TensorReport(name, layer_index, tuple(stored.values.shape), stored.values.dtype.name, None, None))
            stored_forms.clear()
            for scale_name, scales in deferred_scales:
                writer.add_tensor(scale_name, scales)
            writer.end_layer()
        rows, row_bytes = table.values.shape[0], table.values.shape[1] * table.values.itemsize
        row_chunk_bytes = min(chunk_size_bytes, rows_per_chunk(rows, row_bytes) * row_bytes)
        layer_index = writer.begin_layer(ROW_TABLE_LAYER_NAME, kind=LayerKind.ROWS, chunk_size_bytes=max(row_chunk_bytes, 1))
        if table.scales is not None:
            writer.add_tensor(table_name, table.values, quant=QuantScheme.INT8_ROW, scales=table_name + ".scales", error=table.error)
        else:
            writer.add_tensor(table_name, table.values)
        reports.append(TensorReport(table_name, layer_index, tuple(table.values.shape), table.values.dtype.name, *table.errors))
        del table
        writer.end_layer()
        manifest = writer.finish(check=lambda written: _check_runnable(arch, written))
    if progress is not None:
        progress(tensors.size_bytes, tensors.size_bytes)
    output_size = Path(output).stat().st_size
    report = ConversionReport(
        path=Path(output),
        manifest=manifest,
        source_size_bytes=tensors.size_bytes,
        output_size_bytes=output_size,
        seconds=time.perf_counter() - started,
        tensors=tuple(reports),
    )
    logger.info("converted %s -> %s: %d -> %d bytes in %.2f s", source, output, report.source_size_bytes, output_size, report.seconds)
    return report
