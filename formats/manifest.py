"""The manifest: what a .slm file holds and where, as frozen dataclasses.

``parse_manifest`` turns untrusted msgpack bytes into a ``Manifest`` and checks
every invariant FORMAT.md states while it parses, so a ``Manifest`` that exists
is valid. ``encode_manifest`` is its inverse, used by the writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import msgpack

from .constants import (
    LAYER_ALIGNMENT,
    MAX_CHUNK_RAW_SIZE_BYTES,
    MAX_MANIFEST_SIZE_BYTES,
    MAX_NAME_LENGTH,
    MAX_STORE_SIZE_BYTES,
    MAX_TENSOR_NDIM,
    MAX_TOKENIZER_SIZE_BYTES,
    SHA256_SIZE_BYTES,
    TENSOR_ALIGNMENT,
    Codec,
    DType,
    QuantScheme,
)
from ..errors import (
    ManifestDecodeError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    OverlapError,
    UnknownDTypeError,
)

BASE_PASS = 0
"""Chunks of pass 0 hold the model; higher passes are reserved for refinements a v1 reader skips."""


@dataclasses.dataclass(frozen=True, slots=True)
class LayerEntry:
    """One execution step's worth of tensors, contiguous in the layer store."""

    index: int
    name: str
    raw_offset: int  # in the layer store, multiple of LAYER_ALIGNMENT
    raw_size_bytes: int

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.raw_size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class TensorEntry:
    """A tensor's place in the layer store and how to read its values."""

    name: str
    layer_index: int
    dtype: DType
    shape: tuple[int, ...]
    raw_offset: int  # in the layer store, multiple of TENSOR_ALIGNMENT
    quant: QuantScheme
    scales: str | None  # name of the f32 tensor of per-row scales, for INT8_ROW
    max_abs_error: float | None  # largest |w - dequant(q)| the converter introduced
    max_rel_error: float | None  # largest per-row ||w - dequant(q)|| / ||w||

    @property
    def size_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.size_bytes

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One independent compressed frame: where it is in the file and where it lands in the store."""

    index: int
    layer_index: int
    offset: int  # from the start of the data region
    size_bytes: int  # compressed
    raw_offset: int  # in the layer store
    raw_size_bytes: int
    sha256: bytes  # of the compressed bytes; also the chunk's identity
    pass_index: int = BASE_PASS

    @property
    def end(self) -> int:
        return self.offset + self.size_bytes


@dataclasses.dataclass(frozen=True, slots=True)
class TokenizerBlob:
    """tokenizer.json, compressed inside the manifest."""

    codec: Codec
    raw_size_bytes: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a reader needs before the first data byte."""

    config: Mapping[str, Any]
    layers: tuple[LayerEntry, ...]
    tensors: tuple[TensorEntry, ...]
    chunks: tuple[ChunkEntry, ...]  # pass 0, in file order (= execution order)
    refinement_chunks: tuple[ChunkEntry, ...]  # pass > 0: bounds-checked, otherwise unused by v1
    tokenizer: TokenizerBlob | None
    chunk_size_bytes: int
    int8_histogram: tuple[int, ...] | None  # counts of the 256 int8 values over all quantized weights
    digest: str  # sha256 hex of the encoded manifest bytes: the model's identity
    size_bytes: int  # length of the encoded manifest
    tensor_by_name: Mapping[str, TensorEntry] = dataclasses.field(repr=False, compare=False, default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture", ""))

    @property
    def store_size_bytes(self) -> int:
        return self.layers[-1].raw_end if self.layers else 0

    @property
    def data_size_bytes(self) -> int:
        ends = [c.end for c in self.chunks + self.refinement_chunks]
        return max(ends, default=0)

    def tensor(self, name: str) -> TensorEntry:
        return self.tensor_by_name[name]

    def tensors_of_layer(self, layer_index: int) -> tuple[TensorEntry, ...]:
        return tuple(t for t in self.tensors if t.layer_index == layer_index)

    def chunks_of_layer(self, layer_index: int) -> tuple[ChunkEntry, ...]:
        return tuple(c for c in self.chunks if c.layer_index == layer_index)


# ---------------------------------------------------------------- parsing


def _get(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, default: Any = ...) -> Any:
    if key not in mapping:
        if default is ...:
            raise ManifestSchemaError(f"manifest {where}: missing field {key!r}; the file is damaged or not a streamload model")
        return default
    value = mapping[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestSchemaError(f"manifest {where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def _get_size(mapping: Mapping[str, Any], key: str, where: str, *, limit: int, default: Any = ...) -> int:
    value = _get(mapping, key, int, where, default=default)
    if not 0 <= value <= limit:
        raise OutOfBoundsError(f"manifest {where}: {key}={value} is outside [0, {limit}]")
    return value


def _get_list(mapping: Mapping[str, Any], key: str, where: str) -> list[Any]:
    return _get(mapping, key, list, where)


def _get_map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestSchemaError(f"manifest {where}: expected a map, got {type(value).__name__}")
    return value


def _get_name(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(mapping, key, str, where)
    if not value or len(value) > MAX_NAME_LENGTH:
        raise ManifestSchemaError(f"manifest {where}: {key} must be 1..{MAX_NAME_LENGTH} characters")
    return value


def _parse_layers(raw: list[Any]) -> tuple[LayerEntry, ...]:
    layers = []
    previous_end = 0
    for index, item in enumerate(raw):
        where = f"layers[{index}]"
        item = _get_map(item, where)
        layer = LayerEntry(
            index=index,
            name=_get_name(item, "name", where),
            raw_offset=_get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
            raw_size_bytes=_get_size(item, "raw_size", where, limit=MAX_STORE_SIZE_BYTES),
        )
        if layer.raw_offset % LAYER_ALIGNMENT:
            raise ManifestSchemaError(f"manifest {where}: raw_offset {layer.raw_offset} is not a multiple of {LAYER_ALIGNMENT}")
        if layer.raw_offset < previous_end:
            raise OverlapError(f"manifest {where}: layer starts at {layer.raw_offset}, inside the previous layer (ends {previous_end})")
        if layer.raw_end > MAX_STORE_SIZE_BYTES:
            raise OutOfBoundsError(f"manifest {where}: layer ends past the {MAX_STORE_SIZE_BYTES}-byte store limit")
        previous_end = layer.raw_end
        layers.append(layer)
    if not layers:
        raise ManifestSchemaError("manifest: a model needs at least one layer")
    return tuple(layers)


def _parse_tensors(raw: list[Any], layers: tuple[LayerEntry, ...]) -> tuple[TensorEntry, ...]:
    tensors: list[TensorEntry] = []
    for index, item in enumerate(raw):
        where = f"tensors[{index}]"
        item = _get_map(item, where)
        dtype_name = _get(item, "dtype", str, where)
        try:
            dtype = DType(dtype_name)
        except ValueError:
            known = ", ".join(d.value for d in DType)
            raise UnknownDTypeError(f"manifest {where}: unknown dtype {dtype_name!r} (this reader knows {known}); upgrade streamload") from None
        shape_raw = _get(item, "shape", list, where)
        if len(shape_raw) > MAX_TENSOR_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_STORE_SIZE_BYTES for d in shape_raw):
            raise ManifestSchemaError(f"manifest {where}: shape {shape_raw!r} must be at most {MAX_TENSOR_NDIM} non-negative ints")
        quant_name = _get(item, "quant", str, where, default=QuantScheme.NONE.value)
        try:
            quant = QuantScheme(quant_name)
        except ValueError:
            raise ManifestSchemaError(f"manifest {where}: unknown quantization scheme {quant_name!r}") from None
        layer_index = _get_size(item, "layer", where, limit=len(layers) - 1)
        errors = [_get(item, key, (int, float), where, default=None) for key in ("max_abs_error", "max_rel_error")]
        entry = TensorEntry(
            name=_get_name(item, "name", where),
            layer_index=layer_index,
            dtype=dtype,
            shape=tuple(shape_raw),
            raw_offset=_get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
            quant=quant,
            scales=_get(item, "scales", (str, type(None)), where, default=None),
            max_abs_error=None if errors[0] is None else float(errors[0]),
            max_rel_error=None if errors[1] is None else float(errors[1]),
        )
        layer = layers[layer_index]
        if entry.raw_offset % TENSOR_ALIGNMENT:
            raise ManifestSchemaError(f"manifest {where}: tensor {entry.name!r} offset {entry.raw_offset} is not {TENSOR_ALIGNMENT}-byte aligned")
        if entry.raw_offset < layer.raw_offset or entry.raw_end > layer.raw_end:
            raise OutOfBoundsError(f"manifest {where}: tensor {entry.name!r} lies outside its layer {layer.name!r}")
        tensors.append(entry)
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        raise ManifestSchemaError("manifest: two tensors share a name")
    ordered = sorted(tensors, key=lambda t: t.raw_offset)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if after.raw_offset < before.raw_end:
            raise OverlapError(f"manifest: tensors {before.name!r} and {after.name!r} overlap in the layer store")
    for entry in tensors:
        _check_quantization(entry, by_name)
    return tuple(tensors)


def _check_quantization(entry: TensorEntry, by_name: Mapping[str, TensorEntry]) -> None:
    if entry.quant is QuantScheme.NONE:
        if entry.dtype is DType.I8:
            raise ManifestSchemaError(f"manifest: tensor {entry.name!r} is int8 with no quantization scheme")
        return
    # INT8_ROW: an int8 matrix and an f32 vector of one scale per row, in the same layer.
    scales = by_name.get(entry.scales or "")
    if entry.dtype is not DType.I8 or len(entry.shape) != 2 or scales is None:
        raise ManifestSchemaError(f"manifest: tensor {entry.name!r} declares int8_row but is not a 2-D int8 tensor with a scales tensor")
    if scales.dtype is not DType.F32 or scales.shape != entry.shape[:1] or scales.layer_index != entry.layer_index:
        raise ManifestSchemaError(f"manifest: scales {scales.name!r} of {entry.name!r} must be f32 of shape ({entry.shape[0]},) in the same layer")


def _parse_chunk(index: int, item: Any) -> ChunkEntry:
    where = f"chunks[{index}]"
    item = _get_map(item, where)
    sha = _get(item, "sha256", bytes, where)
    if len(sha) != SHA256_SIZE_BYTES:
        raise ManifestSchemaError(f"manifest {where}: sha256 must be {SHA256_SIZE_BYTES} bytes, got {len(sha)}")
    codec = _get(item, "codec", str, where, default=Codec.ZSTD.value)
    if codec != Codec.ZSTD.value:
        raise ManifestSchemaError(f"manifest {where}: unknown chunk codec {codec!r}; upgrade streamload")
    chunk = ChunkEntry(
        index=index,
        layer_index=_get_size(item, "layer", where, limit=MAX_STORE_SIZE_BYTES),
        offset=_get_size(item, "offset", where, limit=MAX_STORE_SIZE_BYTES),
        size_bytes=_get_size(item, "size", where, limit=MAX_CHUNK_RAW_SIZE_BYTES * 2),
        raw_offset=_get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
        raw_size_bytes=_get_size(item, "raw_size", where, limit=MAX_CHUNK_RAW_SIZE_BYTES),
        sha256=sha,
        pass_index=_get_size(item, "pass", where, limit=255, default=BASE_PASS),
    )
    if chunk.size_bytes == 0 or chunk.raw_size_bytes == 0:
        raise ManifestSchemaError(f"manifest {where}: empty chunks are not allowed")
    return chunk


def _parse_chunks(raw: list[Any], layers: tuple[LayerEntry, ...], data_size_bytes: int | None) -> tuple[tuple[ChunkEntry, ...], tuple[ChunkEntry, ...]]:
    chunks = [_parse_chunk(i, item) for i, item in enumerate(raw)]
    previous_end = 0
    for chunk in chunks:  # file order: ascending, no overlap, inside the data region
        if chunk.offset < previous_end:
            raise OverlapError(f"manifest chunks[{chunk.index}]: offset {chunk.offset} overlaps the previous chunk (ends {previous_end}); chunks must be in file order")
        previous_end = chunk.end
        if data_size_bytes is not None and chunk.end > data_size_bytes:
            raise OutOfBoundsError(f"manifest chunks[{chunk.index}]: ends at {chunk.end}, past the {data_size_bytes}-byte data region; the file is truncated")
        if chunk.layer_index >= len(layers):
            raise OutOfBoundsError(f"manifest chunks[{chunk.index}]: layer {chunk.layer_index} does not exist")
    base = [c for c in chunks if c.pass_index == BASE_PASS]
    refinements = [c for c in chunks if c.pass_index != BASE_PASS]
    # Pass 0 chunks tile every layer exactly, layer after layer, in order (FORMAT.md, "Chunks").
    position = 0
    for layer in layers:
        cursor = layer.raw_offset
        while cursor < layer.raw_end:
            if position >= len(base):
                raise ManifestSchemaError(f"manifest: layer {layer.name!r} is not fully covered by chunks")
            chunk = base[position]
            if chunk.layer_index != layer.index or chunk.raw_offset != cursor:
                raise ManifestSchemaError(f"manifest chunks[{chunk.index}]: expected layer {layer.index} at store offset {cursor}; chunks must tile layers in order")
            cursor += chunk.raw_size_bytes
            position += 1
        if cursor != layer.raw_end:
            raise OutOfBoundsError(f"manifest: chunks of layer {layer.name!r} run past its end")
    if position != len(base):
        raise ManifestSchemaError(f"manifest chunks[{base[position].index}]: chunk belongs to no layer range")
    for chunk in refinements:
        layer = layers[chunk.layer_index]
        if chunk.raw_offset < layer.raw_offset or chunk.raw_offset + chunk.raw_size_bytes > layer.raw_end:
            raise OutOfBoundsError(f"manifest chunks[{chunk.index}]: refinement chunk lies outside its layer")
    return tuple(base), tuple(refinements)


def _parse_tokenizer(raw: Any) -> TokenizerBlob | None:
    if raw is None:
        return None
    item = _get_map(raw, "tokenizer")
    codec = _get(item, "codec", str, "tokenizer")
    if codec != Codec.ZSTD.value:
        raise ManifestSchemaError(f"manifest tokenizer: unknown codec {codec!r}")
    return TokenizerBlob(
        codec=Codec.ZSTD,
        raw_size_bytes=_get_size(item, "raw_size", "tokenizer", limit=MAX_TOKENIZER_SIZE_BYTES),
        data=_get(item, "data", bytes, "tokenizer"),
    )


def _parse_histogram(raw: Any) -> tuple[int, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 256 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
        raise ManifestSchemaError("manifest stats.int8_histogram must be 256 non-negative ints")
    return tuple(raw)


def parse_manifest(data: bytes, *, data_size_bytes: int | None = None) -> Manifest:
    """Decode and validate untrusted manifest bytes.

    Args:
        data: the msgpack manifest exactly as stored after the preamble.
        data_size_bytes: length of the data region when known; chunks must lie inside it.

    Returns:
        A valid ``Manifest``. Unknown keys are ignored (forward compatibility).

    Raises:
        ManifestTooLargeError, ManifestDecodeError, ManifestSchemaError (and its subclasses).
    """
    if len(data) > MAX_MANIFEST_SIZE_BYTES:
        raise ManifestTooLargeError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_SIZE_BYTES}-byte limit")
    try:
        root = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, UnicodeDecodeError) as exc:
        raise ManifestDecodeError(f"manifest is not valid msgpack ({exc}); the file is damaged, fetch it again") from None
    root = _get_map(root, "root")
    config = _get(root, "config", dict, "root")
    _get(config, "architecture", str, "config")
    layers = _parse_layers(_get_list(root, "layers", "root"))
    tensors = _parse_tensors(_get_list(root, "tensors", "root"), layers)
    chunks, refinements = _parse_chunks(_get_list(root, "chunks", "root"), layers, data_size_bytes)
    stats = _get(root, "stats", dict, "root", default={})
    return Manifest(
        config=config,
        layers=layers,
        tensors=tensors,
        chunks=chunks,
        refinement_chunks=refinements,
        tokenizer=_parse_tokenizer(root.get("tokenizer")),
        chunk_size_bytes=_get_size(root, "chunk_size", "root", limit=MAX_CHUNK_RAW_SIZE_BYTES),
        int8_histogram=_parse_histogram(stats.get("int8_histogram")),
        digest=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        tensor_by_name={t.name: t for t in tensors},
    )


# ---------------------------------------------------------------- encoding


def encode_manifest(
    *,
    config: Mapping[str, Any],
    layers: list[LayerEntry],
    tensors: list[TensorEntry],
    chunks: list[ChunkEntry],
    tokenizer: TokenizerBlob | None,
    chunk_size_bytes: int,
    int8_histogram: list[int] | None,
) -> bytes:
    """Encode a manifest deterministically (fixed key order, no timestamps)."""
    root: dict[str, Any] = {
        "config": dict(config),
        "chunk_size": chunk_size_bytes,
        "layers": [{"name": layer.name, "raw_offset": layer.raw_offset, "raw_size": layer.raw_size_bytes} for layer in layers],
        "tensors": [_encode_tensor(t) for t in tensors],
        "chunks": [
            {
                "layer": c.layer_index,
                "offset": c.offset,
                "size": c.size_bytes,
                "raw_offset": c.raw_offset,
                "raw_size": c.raw_size_bytes,
                "sha256": c.sha256,
            }
            | ({"pass": c.pass_index} if c.pass_index != BASE_PASS else {})
            for c in chunks
        ],
        "tokenizer": None
        if tokenizer is None
        else {"codec": tokenizer.codec.value, "raw_size": tokenizer.raw_size_bytes, "data": tokenizer.data},
        "stats": {"int8_histogram": int8_histogram} if int8_histogram is not None else {},
    }
    return msgpack.packb(root, use_bin_type=True)


def _encode_tensor(t: TensorEntry) -> dict[str, Any]:
    item: dict[str, Any] = {
        "name": t.name,
        "layer": t.layer_index,
        "dtype": t.dtype.value,
        "shape": list(t.shape),
        "raw_offset": t.raw_offset,
        "quant": t.quant.value,
    }
    if t.scales is not None:
        item["scales"] = t.scales
    if t.max_abs_error is not None:
        item["max_abs_error"] = t.max_abs_error
    if t.max_rel_error is not None:
        item["max_rel_error"] = t.max_rel_error
    return item
