"""The manifest's bytes to and from its types (``entries.py``): parsed from untrusted msgpack, checked, encoded again.

``parse_manifest`` turns untrusted msgpack bytes into a ``Manifest`` (``entries.py``) and checks
every invariant FORMAT.md states while it parses, so a ``Manifest`` that exists is valid;
values are decoded within bounds (``msgpack_bounded.py``) and the chunk list as columns
(``chunk_entries.py``). ``encode_manifest`` is its inverse, used by the writer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import msgpack

from ..errors import (
    ManifestDecodeError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    OverlapError,
    UnknownDTypeError,
)
from .chunk_entries import check_refinements, parse_chunks, parse_chunks_canonical
from .chunk_table import ChunkTable
from .constants import (
    CHUNK_FIELDS,
    CHUNK_PASS_FIELD,
    COARSE_SHIFTS,
    LAYER_ALIGNMENT,
    MAX_CHUNK_RAW_SIZE_BYTES,
    MAX_CONFIG_SIZE_BYTES,
    MAX_MANIFEST_SIZE_BYTES,
    MAX_NAME_LENGTH,
    MAX_STORE_PER_COMPRESSED_BYTE,
    MAX_STORE_SIZE_BYTES,
    MAX_TENSOR_NDIM,
    MAX_TOKENIZER_SIZE_BYTES,
    MAX_UNKNOWN_VALUE_SIZE_BYTES,
    MIN_ZSTD_FRAME_SIZE_BYTES,
    REFINEMENT_PASS,
    STORE_ALLOWANCE_BYTES,
    TENSOR_ALIGNMENT,
    Codec,
    DType,
    LayerKind,
    QuantScheme,
)
from .entries import BASE_PASS, ChunkEntry, LayerEntry, Manifest, TensorEntry, TokenizerBlob
from .msgpack_bounded import (
    ByteRange,
    decode,
    get,
    get_map,
    get_name,
    get_size,
    list_entries,
    locate_map_values,
)

_Item = TypeVar("_Item")

__all__ = ["BASE_PASS", "ChunkEntry", "LayerEntry", "Manifest", "TensorEntry", "TokenizerBlob", "encode_manifest", "parse_manifest"]


def _parse_layers(raw: Iterator[tuple[int, Any]]) -> tuple[LayerEntry, ...]:
    layers = []
    previous_end = 0
    for index, item in raw:
        where = f"layers[{index}]"
        item = get_map(item, where)
        kind_name = get(item, "kind", str, where, default=LayerKind.STEP.value)
        try:
            kind = LayerKind(kind_name)
        except ValueError:
            raise ManifestSchemaError(f"manifest {where}: unknown layer kind {kind_name!r}; upgrade streamload") from None
        if kind is LayerKind.STEP and layers and layers[-1].kind is LayerKind.ROWS:
            raise ManifestSchemaError(f"manifest {where}: an execution step after a row table; row tables come last")
        layer = LayerEntry(
            index=index,
            name=get_name(item, "name", where),
            raw_offset=get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
            raw_size_bytes=get_size(item, "raw_size", where, limit=MAX_STORE_SIZE_BYTES),
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
        item = get_map(item, where)
        dtype_name = get(item, "dtype", str, where)
        try:
            dtype = DType(dtype_name)
        except ValueError:
            known = ", ".join(d.value for d in DType)
            raise UnknownDTypeError(
                f"manifest {where}: unknown dtype {dtype_name!r} (this reader knows {known}); upgrade streamload"
            ) from None
        shape_raw = get(item, "shape", list, where)
        if len(shape_raw) > MAX_TENSOR_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_STORE_SIZE_BYTES for d in shape_raw
        ):
            raise ManifestSchemaError(f"manifest {where}: shape {shape_raw!r} must be at most {MAX_TENSOR_NDIM} non-negative ints")
        quant_name = get(item, "quant", str, where, default=QuantScheme.NONE.value)
        try:
            quant = QuantScheme(quant_name)
        except ValueError:
            raise ManifestSchemaError(f"manifest {where}: unknown quantization scheme {quant_name!r}") from None
        layer_index = get_size(item, "layer", where, limit=len(layers) - 1)
        errors = [get(item, key, (int, float), where, default=None) for key in ("max_abs_error", "max_rel_error")]
        coarse_shift = get(item, "coarse_shift", (int, type(None)), where, default=None)
        if coarse_shift is not None and (isinstance(coarse_shift, bool) or coarse_shift not in COARSE_SHIFTS):
            raise ManifestSchemaError(
                f"manifest {where}: coarse_shift {coarse_shift!r} must be in [{COARSE_SHIFTS.start}, {COARSE_SHIFTS.stop - 1}]"
            )
        entry = TensorEntry(
            name=get_name(item, "name", where),
            layer_index=layer_index,
            dtype=dtype,
            shape=tuple(shape_raw),
            raw_offset=get_size(item, "raw_offset", where, limit=MAX_STORE_SIZE_BYTES),
            quant=quant,
            scales=get(item, "scales", (str, type(None)), where, default=None),
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
    held = _by_layer(tensors, lambda t: t.layer_index)
    for layer in layers:
        if layer.kind is LayerKind.ROWS:
            table = held.get(layer.index, ())
            if len(table) != 1 or len(table[0].shape) != 2:
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


def _parse_tokenizer(data: bytes, byte_range: ByteRange | None) -> TokenizerBlob | None:
    if byte_range is None or data[byte_range[0]] == 0xC0:  # absent or nil
        return None
    fields = locate_map_values(data, byte_range, "tokenizer")
    item = {
        key: decode(data, fields[key], f"tokenizer.{key}", limit_bytes=MAX_NAME_LENGTH * 4)
        for key in ("codec", "raw_size")
        if key in fields
    }
    if "data" in fields:
        item["data"] = decode(data, fields["data"], "tokenizer.data", limit_bytes=MAX_TOKENIZER_SIZE_BYTES + 8)
    codec = get(item, "codec", str, "tokenizer")
    if codec != Codec.ZSTD.value:
        raise ManifestSchemaError(f"manifest tokenizer: unknown codec {codec!r}")
    return TokenizerBlob(
        codec=Codec.ZSTD,
        raw_size_bytes=get_size(item, "raw_size", "tokenizer", limit=MAX_TOKENIZER_SIZE_BYTES),
        data=get(item, "data", bytes, "tokenizer"),
    )


def _parse_histogram(data: bytes, byte_range: ByteRange | None) -> tuple[int, ...] | None:
    if byte_range is None:
        return None
    fields = locate_map_values(data, byte_range, "stats")
    if "int8_histogram" not in fields:
        return None
    raw = decode(data, fields["int8_histogram"], "stats.int8_histogram", limit_bytes=256 * 9 + 3)
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != 256 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in raw):
        raise ManifestSchemaError("manifest stats.int8_histogram must be 256 non-negative ints")
    return tuple(raw)


def _parse_preview_cosine(data: bytes, byte_range: ByteRange | None) -> float | None:
    fields = locate_map_values(data, byte_range, "stats") if byte_range is not None else {}
    if "preview_cosine" not in fields:
        return None
    value = decode(data, fields["preview_cosine"], "stats.preview_cosine", limit_bytes=9)
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
    root = locate_map_values(data, (0, len(data)), "root")
    for key, (start, end) in root.items():
        if key not in _KNOWN_ROOT_KEYS and end - start > MAX_UNKNOWN_VALUE_SIZE_BYTES:
            raise ManifestSchemaError(
                f"manifest root: unknown key {key!r} holds {end - start} bytes, over the {MAX_UNKNOWN_VALUE_SIZE_BYTES}-byte limit"
            )
    for key in ("config", "chunk_size", "layers", "tensors", "chunks"):
        if key not in root:
            raise ManifestSchemaError(f"manifest root: missing field {key!r}; the file is damaged or not a streamload model")
    config = decode(data, root["config"], "config", limit_bytes=MAX_CONFIG_SIZE_BYTES)
    if not isinstance(config, dict):
        raise ManifestSchemaError(f"manifest root: field 'config' has type {type(config).__name__}, expected {dict}")
    get(config, "architecture", str, "config")
    chunk_size = get_size(
        {"chunk_size": decode(data, root["chunk_size"], "chunk_size", limit_bytes=16)},
        "chunk_size",
        "root",
        limit=MAX_CHUNK_RAW_SIZE_BYTES,
    )
    layers = _parse_layers(list_entries(data, root["layers"], "layers"))
    tensors = _parse_tensors(list_entries(data, root["tensors"], "tensors"), layers)
    max_chunks = None if data_size_bytes is None else data_size_bytes // MIN_ZSTD_FRAME_SIZE_BYTES
    canonical = parse_chunks_canonical(data, root["chunks"], layers, data_size_bytes, chunk_size)
    if canonical is not None and (max_chunks is None or len(canonical) <= max_chunks):
        chunk_table, refinements = canonical, ()
    else:
        entries = list_entries(data, root["chunks"], "chunks", max_count=max_chunks)
        chunks, refinements = parse_chunks(entries, layers, data_size_bytes, chunk_size)
        chunk_table = ChunkTable.from_entries(chunks)
    check_refinements(tensors, refinements, chunk_table)
    _check_store_against_chunks(layers, chunk_table, refinements)
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
        tensors_by_layer=_by_layer(tensors, lambda t: t.layer_index),
        refinements_by_layer=_by_layer([c for c in refinements if c.pass_index == REFINEMENT_PASS], lambda c: c.layer_index),
    )


def _check_store_against_chunks(layers: tuple[LayerEntry, ...], chunk_table: ChunkTable, refinements: tuple[ChunkEntry, ...]) -> None:
    """The store a file declares is bounded by what its chunks are (constants.MAX_STORE_PER_COMPRESSED_BYTE)."""
    # the chunks a reader fetches (pass 0 and refinements): a reserved pass is skipped, so it does not count
    compressed = int(chunk_table.size.sum()) + sum(chunk.size_bytes for chunk in refinements if chunk.pass_index == REFINEMENT_PASS)
    store = layers[-1].raw_end
    if store > MAX_STORE_PER_COMPRESSED_BYTE * compressed + STORE_ALLOWANCE_BYTES:
        raise OutOfBoundsError(
            f"manifest: a {store}-byte layer store from {compressed} bytes of chunks, over the bound of "
            f"{MAX_STORE_PER_COMPRESSED_BYTE} times plus {STORE_ALLOWANCE_BYTES >> 20} MiB; the file is hostile or damaged"
        )


def _by_layer(items: Sequence[_Item], layer_of: Callable[[_Item], int]) -> dict[int, tuple[_Item, ...]]:
    """Items grouped by layer, each group in the items' order: one pass, so asking for every layer's is linear."""
    groups: dict[int, list[_Item]] = {}
    for item in items:
        groups.setdefault(layer_of(item), []).append(item)
    return {layer: tuple(group) for layer, group in groups.items()}


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
            dict(zip(CHUNK_FIELDS, (c.layer_index, c.offset, c.size_bytes, c.raw_offset, c.raw_size_bytes, c.sha256), strict=True))
            | ({CHUNK_PASS_FIELD: c.pass_index} if c.pass_index != BASE_PASS else {})
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
