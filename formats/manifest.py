"""The manifest: what a .slm file holds and where, as frozen dataclasses.

``parse_manifest`` turns untrusted msgpack bytes into a ``Manifest`` and checks
every invariant FORMAT.md states while it parses, so a ``Manifest`` that exists
is valid. ``encode_manifest`` is its inverse, used by the writer.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import io
import math
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import (
    FormatError,
    ManifestDecodeError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    OverlapError,
    UnknownDTypeError,
)
from .chunk_table import ChunkTable
from .constants import (
    COARSE_SHIFTS,
    LAYER_ALIGNMENT,
    MAX_CHUNK_RAW_SIZE_BYTES,
    MAX_CONFIG_SIZE_BYTES,
    MAX_ENTRY_SIZE_BYTES,
    MAX_MANIFEST_SIZE_BYTES,
    MAX_MAP_FIELDS,
    MAX_NAME_LENGTH,
    MAX_STORE_SIZE_BYTES,
    MAX_TENSOR_NDIM,
    MAX_TOKENIZER_SIZE_BYTES,
    MAX_UNKNOWN_VALUE_SIZE_BYTES,
    MIN_ZSTD_FRAME_SIZE_BYTES,
    REFINEMENT_PASS,
    SHA256_SIZE_BYTES,
    TENSOR_ALIGNMENT,
    Codec,
    DType,
    LayerKind,
    QuantScheme,
)

BASE_PASS = 0
"""Chunks of pass 0 hold the model (a progressive tensor's coarse levels); pass REFINEMENT_PASS makes those exact."""


@dataclasses.dataclass(frozen=True, slots=True)
class LayerEntry:
    """One execution step's worth of tensors (or one row table), contiguous in the layer store."""

    index: int
    name: str
    raw_offset: int  # in the layer store, multiple of LAYER_ALIGNMENT
    raw_size_bytes: int
    kind: LayerKind = LayerKind.STEP

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
    coarse_shift: int | None = None  # progressive: pass 0 holds coarse levels (quantize.coarse_levels), refinements the rest

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

    @property
    def raw_end(self) -> int:
        return self.raw_offset + self.raw_size_bytes


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
    chunk_table: ChunkTable  # pass 0, in file order (= execution order), as columns; ``chunks`` as ChunkEntry objects
    refinement_chunks: tuple[ChunkEntry, ...]  # pass > 0, in file order: REFINEMENT_PASS ones tile the progressive tensors
    tokenizer: TokenizerBlob | None
    chunk_size_bytes: int
    int8_histogram: tuple[int, ...] | None  # counts of the 256 int8 values over all quantized weights
    digest: str  # sha256 hex of the encoded manifest bytes: the model's identity
    size_bytes: int  # length of the encoded manifest
    tensor_by_name: Mapping[str, TensorEntry] = dataclasses.field(repr=False, compare=False, default_factory=dict)
    preview_cosine: float | None = None  # progressive: the coarse model's mean cosine to the exact one on calibration input

    @property
    def architecture(self) -> str:
        return str(self.config.get("architecture", ""))

    @property
    def store_size_bytes(self) -> int:
        return self.layers[-1].raw_end if self.layers else 0

    @property
    def chunks(self) -> tuple[ChunkEntry, ...]:
        """Pass-0 chunks in file order (= execution order), made from ``chunk_table`` on first use."""
        return self.chunk_table.entries()

    @property
    def data_size_bytes(self) -> int:
        # chunks are in file order (ascending, no overlap): the last of each list ends furthest
        ends = [int(self.chunk_table.end[-1])] if len(self.chunk_table) else []
        return max(ends + [c.end for c in self.refinement_chunks[-1:]], default=0)

    def tensor(self, name: str) -> TensorEntry:
        return self.tensor_by_name[name]

    def tensors_of_layer(self, layer_index: int) -> tuple[TensorEntry, ...]:
        return tuple(t for t in self.tensors if t.layer_index == layer_index)

    def chunks_of_layer(self, layer_index: int) -> tuple[ChunkEntry, ...]:
        return tuple(c for c in self.chunks if c.layer_index == layer_index)

    def refinements_of_layer(self, layer_index: int) -> tuple[ChunkEntry, ...]:
        """The REFINEMENT_PASS chunks that make this layer's progressive tensors exact (none for a plain layer)."""
        return tuple(c for c in self.refinement_chunks if c.layer_index == layer_index and c.pass_index == REFINEMENT_PASS)

    @property
    def progressive(self) -> bool:
        """Some tensor arrives coarse first (its pass-0 chunks) and exact after its refinement chunks."""
        return any(t.coarse_shift is not None for t in self.tensors)

    def file_order_chunks(self) -> tuple[ChunkEntry, ...]:
        """Every chunk a reader fetches (pass 0 and refinements), in file order."""
        refinements = [c for c in self.refinement_chunks if c.pass_index == REFINEMENT_PASS]
        if not refinements:
            return self.chunks
        return tuple(sorted(self.chunks + tuple(refinements), key=lambda c: c.offset))

    def file_order_table(self) -> ChunkTable:
        """``file_order_chunks`` as a ChunkTable (no ChunkEntry is made for a model without refinements)."""
        refinements = [c for c in self.refinement_chunks if c.pass_index == REFINEMENT_PASS]
        if not refinements:
            return self.chunk_table
        merged = ChunkTable.concat([self.chunk_table, ChunkTable.from_entries(refinements)])
        return merged.take(np.argsort(merged.offset, kind="stable"))

    @property
    def step_count(self) -> int:
        """Layers that are execution steps; the row tables (if any) follow them."""
        return sum(1 for layer in self.layers if layer.kind is LayerKind.STEP)


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


# ---------------------------------------------------------------- bounded msgpack decoding
#
# The manifest is read in two kinds of steps: skipping (msgpack's skip() walks a value without
# building any object) to learn where each value starts and ends, then decoding a value only
# once its encoded size is known to be under its bound. Nothing is decoded that could cost more
# than a small multiple of its bytes, whatever the msgpack nests inside it.

_DECODE_ERRORS = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.OutOfData, UnicodeDecodeError)
Span = tuple[int, int]  # [start, end) of one encoded value in the manifest bytes


def _decode_failed(exc: Exception) -> ManifestDecodeError:
    return ManifestDecodeError(f"manifest is not valid msgpack ({exc or type(exc).__name__}); the file is damaged, fetch it again")


def _is_map(first_byte: int) -> bool:
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def _is_str(first_byte: int) -> bool:
    return 0xA0 <= first_byte <= 0xBF or first_byte in (0xD9, 0xDA, 0xDB)


def _is_array(first_byte: int) -> bool:
    return 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD)


def _msgpack_limits(limit_bytes: int) -> dict[str, int]:
    """msgpack's per-object caps: no string, blob, array or map may claim more than ``limit_bytes`` elements."""
    return {
        "max_str_len": limit_bytes,
        "max_bin_len": limit_bytes,
        "max_array_len": limit_bytes,
        "max_map_len": min(limit_bytes, MAX_MAP_FIELDS),
        "max_ext_len": limit_bytes,
    }


def _unpacker(data: bytes, start: int, *, limit_bytes: int) -> msgpack.Unpacker:
    """An unpacker reading ``data`` from ``start`` that decodes no container or string longer than ``limit_bytes``."""
    stream = io.BytesIO(data)  # shares the bytes object's buffer: no copy
    stream.seek(start)
    return msgpack.Unpacker(
        stream,
        raw=False,
        strict_map_key=True,
        max_buffer_size=MAX_MANIFEST_SIZE_BYTES,
        **_msgpack_limits(limit_bytes),
    )


def _map_spans(data: bytes, span: Span, where: str) -> dict[str, Span]:
    """Where each key's value lies in an encoded map, found by skipping (nothing inside is decoded)."""
    start, end = span
    if not _is_map(data[start]):
        try:
            _unpacker(data, start, limit_bytes=0).skip()
        except _DECODE_ERRORS as exc:
            raise _decode_failed(exc) from None
        raise ManifestSchemaError(f"manifest {where}: expected a map")
    scout = _unpacker(data, start, limit_bytes=MAX_NAME_LENGTH * 4)
    spans: dict[str, Span] = {}
    try:
        count = scout.read_map_header()
        if count > MAX_MAP_FIELDS:
            raise ManifestSchemaError(f"manifest {where}: {count} keys, over the limit of {MAX_MAP_FIELDS}")
        for _ in range(count):
            key_start = start + scout.tell()
            if key_start >= end:
                raise ManifestDecodeError(f"manifest {where}: the map is truncated; the file is damaged, fetch it again")
            if not _is_str(data[key_start]):  # a key is decoded only once known to be a (bounded) string
                raise ManifestSchemaError(f"manifest {where}: a key is not a string")
            key = scout.unpack()
            value_start = start + scout.tell()
            scout.skip()
            spans[key] = (value_start, start + scout.tell())
    except FormatError:
        raise
    except _DECODE_ERRORS as exc:
        raise _decode_failed(exc) from None
    if start + scout.tell() != end:
        raise ManifestDecodeError(f"manifest {where}: {end - start - scout.tell()} bytes after the map; the file is damaged")
    return spans


def _decode(data: bytes, span: Span, where: str, *, limit_bytes: int) -> Any:
    """One value, decoded only when its encoding is at most ``limit_bytes``."""
    start, end = span
    if end - start > limit_bytes:
        raise ManifestSchemaError(f"manifest {where}: {end - start} bytes, over the {limit_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            memoryview(data)[start:end],
            raw=False,
            strict_map_key=True,
            **_msgpack_limits(limit_bytes),
        )
    except _DECODE_ERRORS as exc:
        raise _decode_failed(exc) from None


def _entries(data: bytes, span: Span, where: str, *, max_count: int | None = None) -> Iterator[tuple[int, Any]]:
    """(index, decoded entry) of an encoded list, one entry alive at a time, each at most MAX_ENTRY_SIZE_BYTES."""
    start, _ = span
    if not _is_array(data[start]):
        raise ManifestSchemaError(f"manifest root: field {where!r} must be a list")
    scout = _unpacker(data, start, limit_bytes=0)  # only skips
    decoder = _unpacker(data, start, limit_bytes=MAX_ENTRY_SIZE_BYTES)
    try:
        count = scout.read_array_header()
        decoder.read_array_header()
        if max_count is not None and count > max_count:
            raise OutOfBoundsError(f"manifest: {count} {where}, more than the file can hold ({max_count})")
        for index in range(count):
            before = scout.tell()
            scout.skip()
            if scout.tell() - before > MAX_ENTRY_SIZE_BYTES:
                raise ManifestSchemaError(
                    f"manifest {where}[{index}]: {scout.tell() - before} bytes, over the {MAX_ENTRY_SIZE_BYTES}-byte limit"
                )
            yield index, decoder.unpack()
    except FormatError:
        raise
    except _DECODE_ERRORS as exc:
        raise _decode_failed(exc) from None


# ---------------------------------------------------------------- entries


def _parse_layers(raw: Iterator[tuple[int, Any]]) -> tuple[LayerEntry, ...]:
    layers = []
    previous_end = 0
    for index, item in raw:
        where = f"layers[{index}]"
        item = _get_map(item, where)
        kind_name = _get(item, "kind", str, where, default=LayerKind.STEP.value)
        try:
            kind = LayerKind(kind_name)
        except ValueError:
            raise ManifestSchemaError(f"manifest {where}: unknown layer kind {kind_name!r}; upgrade streamload") from None
        if kind is LayerKind.STEP and layers and layers[-1].kind is LayerKind.ROWS:
            raise ManifestSchemaError(f"manifest {where}: an execution step after a row table; row tables come last")
        layer = LayerEntry(
            index=index,
            name=_get_name(item, "name", where),
            raw_offset=_get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
            raw_size_bytes=_get_size(item, "raw_size", where, limit=MAX_STORE_SIZE_BYTES),
            kind=kind,
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


def _parse_tensors(raw: Iterator[tuple[int, Any]], layers: tuple[LayerEntry, ...]) -> tuple[TensorEntry, ...]:
    tensors: list[TensorEntry] = []
    for index, item in raw:
        where = f"tensors[{index}]"
        item = _get_map(item, where)
        dtype_name = _get(item, "dtype", str, where)
        try:
            dtype = DType(dtype_name)
        except ValueError:
            known = ", ".join(d.value for d in DType)
            raise UnknownDTypeError(
                f"manifest {where}: unknown dtype {dtype_name!r} (this reader knows {known}); upgrade streamload"
            ) from None
        shape_raw = _get(item, "shape", list, where)
        if len(shape_raw) > MAX_TENSOR_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_STORE_SIZE_BYTES for d in shape_raw
        ):
            raise ManifestSchemaError(f"manifest {where}: shape {shape_raw!r} must be at most {MAX_TENSOR_NDIM} non-negative ints")
        quant_name = _get(item, "quant", str, where, default=QuantScheme.NONE.value)
        try:
            quant = QuantScheme(quant_name)
        except ValueError:
            raise ManifestSchemaError(f"manifest {where}: unknown quantization scheme {quant_name!r}") from None
        layer_index = _get_size(item, "layer", where, limit=len(layers) - 1)
        errors = [_get(item, key, (int, float), where, default=None) for key in ("max_abs_error", "max_rel_error")]
        coarse_shift = _get(item, "coarse_shift", (int, type(None)), where, default=None)
        if coarse_shift is not None and (isinstance(coarse_shift, bool) or coarse_shift not in COARSE_SHIFTS):
            raise ManifestSchemaError(
                f"manifest {where}: coarse_shift {coarse_shift!r} must be in [{COARSE_SHIFTS.start}, {COARSE_SHIFTS.stop - 1}]"
            )
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
            coarse_shift=coarse_shift,
        )
        layer = layers[layer_index]
        if entry.raw_offset % TENSOR_ALIGNMENT:
            raise ManifestSchemaError(
                f"manifest {where}: tensor {entry.name!r} offset {entry.raw_offset} is not {TENSOR_ALIGNMENT}-byte aligned"
            )
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
        _check_quantization(entry, by_name, layers)
    for layer in layers:
        if layer.kind is LayerKind.ROWS:
            held = [t for t in tensors if t.layer_index == layer.index]
            if len(held) != 1 or len(held[0].shape) != 2:
                raise ManifestSchemaError(f"manifest: row table {layer.name!r} must hold exactly one 2-D tensor")
    return tuple(tensors)


def _check_quantization(entry: TensorEntry, by_name: Mapping[str, TensorEntry], layers: tuple[LayerEntry, ...]) -> None:
    if entry.coarse_shift is not None and (entry.quant is not QuantScheme.INT8_ROW or layers[entry.layer_index].kind is not LayerKind.STEP):
        raise ManifestSchemaError(f"manifest: tensor {entry.name!r} is progressive but not an int8_row tensor of an execution step")
    if entry.quant is QuantScheme.NONE:
        if entry.dtype is DType.I8:
            raise ManifestSchemaError(f"manifest: tensor {entry.name!r} is int8 with no quantization scheme")
        return
    # INT8_ROW: an int8 matrix and an f32 vector of one scale per row, in the same layer (a row table's: in a step).
    scales = by_name.get(entry.scales or "")
    if entry.dtype is not DType.I8 or len(entry.shape) != 2 or scales is None:
        raise ManifestSchemaError(f"manifest: tensor {entry.name!r} declares int8_row but is not a 2-D int8 tensor with a scales tensor")
    in_rows = layers[entry.layer_index].kind is LayerKind.ROWS
    placed = layers[scales.layer_index].kind is LayerKind.STEP if in_rows else scales.layer_index == entry.layer_index
    if scales.dtype is not DType.F32 or scales.shape != entry.shape[:1] or not placed:
        where = "in an execution step" if in_rows else "in the same layer"
        raise ManifestSchemaError(f"manifest: scales {scales.name!r} of {entry.name!r} must be f32 of shape ({entry.shape[0]},) {where}")


def _parse_chunk(index: int, item: Any, chunk_size_bytes: int) -> ChunkEntry:
    """The fast path: one dict lookup and one type test per field; anything unusual goes to the checked path."""
    try:
        layer, offset, size, raw_offset, raw_size, sha = (
            item["layer"],
            item["offset"],
            item["size"],
            item["raw_offset"],
            item["raw_size"],
            item["sha256"],
        )
        pass_index = item.get("pass", BASE_PASS)
        codec = item.get("codec", _ZSTD)
    except (KeyError, TypeError, AttributeError):
        return _parse_chunk_checked(index, item, chunk_size_bytes)
    if (
        type(layer) is int and type(offset) is int and type(size) is int and type(raw_offset) is int and type(raw_size) is int
        and type(pass_index) is int and type(sha) is bytes and len(sha) == SHA256_SIZE_BYTES and codec == _ZSTD
        and 0 <= layer <= MAX_STORE_SIZE_BYTES and 0 <= offset <= MAX_STORE_SIZE_BYTES and 0 < size <= MAX_CHUNK_RAW_SIZE_BYTES * 2
        and 0 <= raw_offset <= MAX_STORE_SIZE_BYTES and 0 < raw_size <= chunk_size_bytes and 0 <= pass_index <= 255
    ):  # fmt: skip
        return ChunkEntry(index, layer, offset, size, raw_offset, raw_size, sha, pass_index)
    return _parse_chunk_checked(index, item, chunk_size_bytes)


_ZSTD = Codec.ZSTD.value


def _parse_chunk_checked(index: int, item: Any, chunk_size_bytes: int) -> ChunkEntry:
    """Field by field, raising the error that names what is wrong."""
    where = f"chunks[{index}]"
    item = _get_map(item, where)
    sha = _get(item, "sha256", bytes, where)
    if len(sha) != SHA256_SIZE_BYTES:
        raise ManifestSchemaError(f"manifest {where}: sha256 must be {SHA256_SIZE_BYTES} bytes, got {len(sha)}")
    codec = _get(item, "codec", str, where, default=_ZSTD)
    if codec != _ZSTD:
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
    if chunk.raw_size_bytes > chunk_size_bytes:
        raise ManifestSchemaError(f"manifest {where}: raw_size {chunk.raw_size_bytes} is over the manifest's chunk_size {chunk_size_bytes}")
    raise AssertionError(f"manifest {where}: the fast path refused a valid chunk")  # pragma: no cover


def _parse_chunks(
    raw: Iterator[tuple[int, Any]], layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> tuple[tuple[ChunkEntry, ...], tuple[ChunkEntry, ...]]:
    base: list[ChunkEntry] = []
    refinements: list[ChunkEntry] = []
    previous_end = 0
    layer_count = len(layers)
    for index, item in raw:  # file order: ascending, no overlap, inside the data region
        chunk = _parse_chunk(index, item, chunk_size_bytes)
        if chunk.offset < previous_end:
            raise OverlapError(
                f"manifest chunks[{index}]: offset {chunk.offset} overlaps the previous chunk (ends {previous_end}); "
                "chunks must be in file order"
            )
        previous_end = chunk.offset + chunk.size_bytes
        if data_size_bytes is not None and previous_end > data_size_bytes:
            raise OutOfBoundsError(
                f"manifest chunks[{index}]: ends at {previous_end}, past the {data_size_bytes}-byte data region; the file is truncated"
            )
        if chunk.layer_index >= layer_count:
            raise OutOfBoundsError(f"manifest chunks[{index}]: layer {chunk.layer_index} does not exist")
        (base if chunk.pass_index == BASE_PASS else refinements).append(chunk)
    # Pass 0 chunks tile every layer exactly, layer after layer, in order (FORMAT.md, "Chunks").
    position = 0
    for layer in layers:
        cursor = layer.raw_offset
        while cursor < layer.raw_end:
            if position >= len(base):
                raise ManifestSchemaError(f"manifest: layer {layer.name!r} is not fully covered by chunks")
            chunk = base[position]
            if chunk.layer_index != layer.index or chunk.raw_offset != cursor:
                raise ManifestSchemaError(
                    f"manifest chunks[{chunk.index}]: expected layer {layer.index} at store offset {cursor}; "
                    "chunks must tile layers in order"
                )
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


def _check_refinements(tensors: tuple[TensorEntry, ...], refinements: tuple[ChunkEntry, ...]) -> None:
    """REFINEMENT_PASS chunks tile every progressive tensor exactly, each inside one (FORMAT.md, "Progressive tensors")."""
    progressive = sorted((t for t in tensors if t.coarse_shift is not None), key=lambda t: t.raw_offset)
    starts = [t.raw_offset for t in progressive]
    covered = [t.raw_offset for t in progressive]  # per tensor: where the next refinement chunk must start
    for chunk in refinements:
        if chunk.pass_index != REFINEMENT_PASS:
            continue  # a reserved pass: bounds-checked above, skipped
        position = bisect.bisect_right(starts, chunk.raw_offset) - 1
        tensor = progressive[position] if position >= 0 else None
        if tensor is None or tensor.layer_index != chunk.layer_index or chunk.raw_offset + chunk.raw_size_bytes > tensor.raw_end:
            raise ManifestSchemaError(f"manifest chunks[{chunk.index}]: a refinement chunk must lie inside one progressive tensor")
        if chunk.raw_offset != covered[position]:
            raise ManifestSchemaError(
                f"manifest chunks[{chunk.index}]: refinement of {tensor.name!r} at store offset {chunk.raw_offset}, expected "
                f"{covered[position]}; refinement chunks tile their tensor in order"
            )
        covered[position] += chunk.raw_size_bytes
    for tensor, end in zip(progressive, covered, strict=True):
        if end != tensor.raw_end:
            raise ManifestSchemaError(f"manifest: progressive tensor {tensor.name!r} is not fully covered by refinement chunks")


# The writer's encoding of a chunk entry (encode_manifest): a 6-key map, keys in this order, each value a
# non-negative msgpack int but the sha256, a 32-byte bin. A list of such entries is read for the whole list at
# once with numpy (~0.15 us per entry instead of ~5); anything else (other keys, another order, a `pass`) is
# parsed entry by entry, and so is a list this reading finds anything wrong with, to raise the precise error.
_CHUNK_KEYS = [msgpack.packb(key) for key in ("layer", "offset", "size", "raw_offset", "raw_size", "sha256")]
_SHA256_BIN_HEADER = bytes([0xC4, SHA256_SIZE_BYTES])
_CHUNK_OPENING = np.frombuffer(b"\x86" + _CHUNK_KEYS[0], np.uint8)  # a map of 6 whose first key is "layer"
_SCAN_BLOCK_BYTES = 1 << 20
_MIN_CHUNK_ENTRY_BYTES = 1 + sum(map(len, _CHUNK_KEYS)) + 5 * 1 + 2 + SHA256_SIZE_BYTES  # every int in one byte
_MAX_CHUNK_ENTRY_BYTES = _MIN_CHUNK_ENTRY_BYTES + 5 * 8  # every int in nine
_INT_WIDTH = np.full(256, -1, np.int64)  # by first byte: the bytes after it of a non-negative msgpack int (-1: not one)
_INT_WIDTH[:0x80], _INT_WIDTH[0xCC], _INT_WIDTH[0xCD], _INT_WIDTH[0xCE], _INT_WIDTH[0xCF] = 0, 1, 2, 4, 8
_INT_SHIFT = (8 * (8 - np.clip(_INT_WIDTH, 1, 8))).astype(np.uint64)  # of the 8 bytes read after the first byte


def _parse_chunks_canonical(
    data: bytes, span: Span, layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> ChunkTable | None:
    """The chunk list when every entry has the writer's encoding and every rule of ``_parse_chunks`` holds, else None.
    Columns only: no ChunkEntry is made here (``ChunkTable.entries`` makes them when someone asks)."""
    columns = _chunk_columns(data, span, layers, data_size_bytes, chunk_size_bytes)
    if columns is None:
        return None
    layer, offset, size, raw_offset, raw_size, sha_at = columns
    whole = np.frombuffer(data, np.uint8)
    return ChunkTable(
        index=np.arange(len(layer), dtype=np.int64),
        layer=layer,
        offset=offset,
        size=size,
        raw_offset=raw_offset,
        raw_size=raw_size,
        sha256=sliding_window_view(whole, SHA256_SIZE_BYTES)[sha_at],  # (n, 32): a row copied per chunk
    )


def _entry_starts(whole: np.ndarray, count: int) -> np.ndarray | None:
    """Where the list's ``count`` entries open (``_CHUNK_OPENING``), the first at 0; None for any other number of
    openings. Read a block at a time: no array is longer than a block or than ``count``. (Openings cannot overlap.)"""
    found: list[np.ndarray] = []
    total = 0
    last = len(whole) - len(_CHUNK_OPENING)  # the last position an opening fits at
    for block in range(0, last + 1, _SCAN_BLOCK_BYTES):
        candidates = np.flatnonzero(whole[block : min(block + _SCAN_BLOCK_BYTES, last + 1)] == _CHUNK_OPENING[0]) + block
        for k in range(1, len(_CHUNK_OPENING)):
            candidates = candidates[whole[candidates + k] == _CHUNK_OPENING[k]]
        total += len(candidates)
        if total > count:
            return None
        found.append(candidates)
    if total != count:
        return None
    starts = np.concatenate(found)
    return starts if starts[0] == 0 else None


def _chunk_columns(
    data: bytes, span: Span, layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> np.ndarray | None:
    """(layer, offset, size, raw_offset, raw_size, where the sha256 starts in ``data``) of every entry, as rows of an
    array; None when an entry is not in the writer's encoding or a rule of ``_parse_chunks`` does not hold.

    Only bytes are read (nothing is decoded), and no array is longer than the list's count, itself at most
    its bytes / 85. Entries are found by their first bytes (a fixmap of 6, then "layer") and must then tile
    the list exactly, so a look-alike inside a sha256 only sends the list to the entry-by-entry path.
    """
    start, end = span
    first = data[start]
    if 0x90 <= first <= 0x9F:
        count, body = first & 0x0F, start + 1
    elif first == 0xDC:
        count, body = int.from_bytes(data[start + 1 : start + 3], "big"), start + 3
    elif first == 0xDD:
        count, body = int.from_bytes(data[start + 1 : start + 5], "big"), start + 5
    else:
        return None
    list_bytes = end - body
    if count == 0 or not _MIN_CHUNK_ENTRY_BYTES * count <= list_bytes <= _MAX_CHUNK_ENTRY_BYTES * count:
        return None
    whole = np.frombuffer(data, np.uint8, list_bytes, body)
    starts = _entry_starts(whole, count)
    if starts is None:
        return None
    ok = np.ones(count, bool)
    # every 8 bytes of the list, from each byte on, as an integer (unaligned views, no copy): one read per 8 bytes
    little = np.ndarray((list_bytes - 7,), "<u8", whole, strides=(1,))
    big = np.ndarray((list_bytes - 7,), ">u8", whole, strides=(1,))

    # A read that would run past the list is clipped to its last bytes (np.minimum): only a read starting within 8
    # bytes of the list's end is, and its entry's sha256 then ends past the list, so the list is refused below.
    def expect(at: np.ndarray, pattern: bytes) -> np.ndarray:
        nonlocal ok
        for k in range(0, len(pattern), 8):
            piece = pattern[k : k + 8]
            mask = np.uint64((1 << 8 * len(piece)) - 1)
            ok &= (little[np.minimum(at + k, list_bytes - 8)] & mask) == np.uint64(int.from_bytes(piece, "little"))
        return at + len(pattern)

    def integer(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a non-negative msgpack int, big-endian
        nonlocal ok
        kind = whole[np.minimum(at, list_bytes - 1)]
        widths = _INT_WIDTH[kind]
        ok &= widths >= 0
        following = big[np.minimum(at + 1, list_bytes - 8)].astype(np.uint64)  # the 8 bytes after the kind
        value = np.where(widths == 0, kind.astype(np.uint64), following >> _INT_SHIFT[kind])
        return value, at + 1 + np.maximum(widths, 0)

    at = starts + 1 + len(_CHUNK_KEYS[0])
    fields = []
    for key in _CHUNK_KEYS[1:]:
        value, at = integer(at)
        fields.append(value)
        at = expect(at, key)
    sha_at = expect(at, _SHA256_BIN_HEADER)
    if not ok.all() or sha_at[-1] + SHA256_SIZE_BYTES != list_bytes or (sha_at[:-1] + SHA256_SIZE_BYTES != starts[1:]).any():
        return None
    limits = [MAX_STORE_SIZE_BYTES, MAX_STORE_SIZE_BYTES, MAX_CHUNK_RAW_SIZE_BYTES * 2, MAX_STORE_SIZE_BYTES, chunk_size_bytes]
    if any((field > np.uint64(limit)).any() for field, limit in zip(fields, limits, strict=True)):
        return None
    layer, offset, size, raw_offset, raw_size = (field.astype(np.int64) for field in fields)
    if (size == 0).any() or (raw_size == 0).any() or (layer >= len(layers)).any():
        return None
    chunk_end = offset + size  # file order: ascending, no overlap, inside the data region
    if (offset[1:] < chunk_end[:-1]).any() or (data_size_bytes is not None and (chunk_end > data_size_bytes).any()):
        return None
    # pass 0 tiles every layer exactly, layer after layer (FORMAT.md, "Chunks"); an empty layer has no chunks
    layer_offsets = np.array([entry.raw_offset for entry in layers], np.int64)
    layer_ends = np.array([entry.raw_end for entry in layers], np.int64)
    filled = np.flatnonzero(layer_ends > layer_offsets)
    first_of_layer = np.ones(count, bool)
    first_of_layer[1:] = layer[1:] != layer[:-1]
    last_of_layer = np.roll(first_of_layer, -1)
    follows = np.concatenate([[0], raw_offset[:-1] + raw_size[:-1]])
    if (
        not np.array_equal(layer[first_of_layer], filled)
        or (raw_offset != np.where(first_of_layer, layer_offsets[layer], follows)).any()
        or not np.array_equal((raw_offset + raw_size)[last_of_layer], layer_ends[filled])
    ):
        return None
    return np.stack([layer, offset, size, raw_offset, raw_size, sha_at + body])


def _parse_tokenizer(data: bytes, span: Span | None) -> TokenizerBlob | None:
    if span is None or data[span[0]] == 0xC0:  # absent or nil
        return None
    fields = _map_spans(data, span, "tokenizer")
    item = {
        key: _decode(data, fields[key], f"tokenizer.{key}", limit_bytes=MAX_NAME_LENGTH * 4)
        for key in ("codec", "raw_size")
        if key in fields
    }
    if "data" in fields:
        item["data"] = _decode(data, fields["data"], "tokenizer.data", limit_bytes=MAX_TOKENIZER_SIZE_BYTES + 8)
    codec = _get(item, "codec", str, "tokenizer")
    if codec != Codec.ZSTD.value:
        raise ManifestSchemaError(f"manifest tokenizer: unknown codec {codec!r}")
    return TokenizerBlob(
        codec=Codec.ZSTD,
        raw_size_bytes=_get_size(item, "raw_size", "tokenizer", limit=MAX_TOKENIZER_SIZE_BYTES),
        data=_get(item, "data", bytes, "tokenizer"),
    )


def _parse_histogram(data: bytes, span: Span | None) -> tuple[int, ...] | None:
    if span is None:
        return None
    fields = _map_spans(data, span, "stats")
    if "int8_histogram" not in fields:
        return None
    raw = _decode(data, fields["int8_histogram"], "stats.int8_histogram", limit_bytes=256 * 9 + 3)
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 256 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
        raise ManifestSchemaError("manifest stats.int8_histogram must be 256 non-negative ints")
    return tuple(raw)


def _parse_preview_cosine(data: bytes, span: Span | None) -> float | None:
    fields = _map_spans(data, span, "stats") if span is not None else {}
    if "preview_cosine" not in fields:
        return None
    value = _decode(data, fields["preview_cosine"], "stats.preview_cosine", limit_bytes=9)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value <= 1.0:
        raise ManifestSchemaError("manifest stats.preview_cosine must be a number in [-1, 1]")
    return float(value)


_KNOWN_ROOT_KEYS = frozenset({"config", "chunk_size", "layers", "tensors", "chunks", "tokenizer", "stats"})


def parse_manifest(data: bytes | memoryview, *, data_size_bytes: int | None = None) -> Manifest:
    """Decode and validate untrusted manifest bytes.

    Peak memory is a small multiple of ``len(data)`` whatever the bytes hold: values are
    measured before they are decoded (the bounds in constants.py), one list entry is decoded at
    a time, and a root key this reader does not know is skipped without being decoded.

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
    data = bytes(data)
    if not data:
        raise ManifestDecodeError("manifest is empty; the file is damaged, fetch it again")
    root = _map_spans(data, (0, len(data)), "root")
    for key, (start, end) in root.items():
        if key not in _KNOWN_ROOT_KEYS and end - start > MAX_UNKNOWN_VALUE_SIZE_BYTES:
            raise ManifestSchemaError(
                f"manifest root: unknown key {key!r} holds {end - start} bytes, over the {MAX_UNKNOWN_VALUE_SIZE_BYTES}-byte limit"
            )
    for key in ("config", "chunk_size", "layers", "tensors", "chunks"):
        if key not in root:
            raise ManifestSchemaError(f"manifest root: missing field {key!r}; the file is damaged or not a streamload model")
    config = _decode(data, root["config"], "config", limit_bytes=MAX_CONFIG_SIZE_BYTES)
    if not isinstance(config, dict):
        raise ManifestSchemaError(f"manifest root: field 'config' has type {type(config).__name__}, expected {dict}")
    _get(config, "architecture", str, "config")
    chunk_size = _get_size(
        {"chunk_size": _decode(data, root["chunk_size"], "chunk_size", limit_bytes=16)},
        "chunk_size",
        "root",
        limit=MAX_CHUNK_RAW_SIZE_BYTES,
    )
    layers = _parse_layers(_entries(data, root["layers"], "layers"))
    tensors = _parse_tensors(_entries(data, root["tensors"], "tensors"), layers)
    max_chunks = None if data_size_bytes is None else data_size_bytes // MIN_ZSTD_FRAME_SIZE_BYTES
    canonical = _parse_chunks_canonical(data, root["chunks"], layers, data_size_bytes, chunk_size)
    if canonical is not None and (max_chunks is None or len(canonical) <= max_chunks):
        chunk_table, refinements = canonical, ()
    else:
        entries = _entries(data, root["chunks"], "chunks", max_count=max_chunks)
        chunks, refinements = _parse_chunks(entries, layers, data_size_bytes, chunk_size)
        chunk_table = ChunkTable.from_entries(chunks)
    _check_refinements(tensors, refinements)
    return Manifest(
        config=config,
        layers=layers,
        tensors=tensors,
        chunk_table=chunk_table,
        refinement_chunks=refinements,
        tokenizer=_parse_tokenizer(data, root.get("tokenizer")),
        chunk_size_bytes=chunk_size,
        int8_histogram=_parse_histogram(data, root.get("stats")),
        preview_cosine=_parse_preview_cosine(data, root.get("stats")),
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
    preview_cosine: float | None = None,
) -> bytes:
    """Encode a manifest deterministically (fixed key order, no timestamps)."""
    root: dict[str, Any] = {
        "config": dict(config),
        "chunk_size": chunk_size_bytes,
        "layers": [
            {"name": layer.name, "raw_offset": layer.raw_offset, "raw_size": layer.raw_size_bytes}
            | ({"kind": layer.kind.value} if layer.kind is not LayerKind.STEP else {})
            for layer in layers
        ],
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
        "stats": ({"int8_histogram": int8_histogram} if int8_histogram is not None else {})
        | ({"preview_cosine": preview_cosine} if preview_cosine is not None else {}),
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
    if t.coarse_shift is not None:
        item["coarse_shift"] = t.coarse_shift
    return item
