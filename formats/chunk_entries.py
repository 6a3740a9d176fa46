"""The manifest's chunk entries parsed into columns (a ``ChunkTable``).

Read as numpy columns when it is in the writer's own encoding (no object per chunk),
else entry by entry, each entry checked (file order, no overlap, inside the data region, a known layer and pass);
refinement chunks checked against the progressive tensors they refine."""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import (
    ManifestSchemaError,
    OutOfBoundsError,
    OverlapError,
)
from .chunk_table import ChunkTable
from .constants import (
    CHUNK_CODEC_FIELD,
    CHUNK_FIELDS,
    CHUNK_PASS_FIELD,
    MAX_CHUNK_RAW_SIZE_BYTES,
    MAX_CHUNK_SIZE_BYTES,
    MAX_PASS,
    MAX_STORE_SIZE_BYTES,
    REFINEMENT_PASS,
    SHA256_SIZE_BYTES,
    Codec,
)
from .entries import BASE_PASS, ChunkEntry, LayerEntry, TensorEntry
from .msgpack_bounded import (
    ByteRange,
    get,
    get_map,
    get_size,
)


def _parse_chunk(index: int, item: Any, chunk_size_bytes: int) -> ChunkEntry:
    """The fast path: one dict lookup and one type test per field; anything unusual goes to the checked path."""
    try:
        layer, offset, size, raw_offset, raw_size, sha = _CHUNK_VALUES(item)
        pass_index = item.get(CHUNK_PASS_FIELD, BASE_PASS)
        codec = item.get(CHUNK_CODEC_FIELD, _ZSTD)
    except (KeyError, TypeError, AttributeError):
        return _parse_chunk_checked(index, item, chunk_size_bytes)
    if (
        type(layer) is int and type(offset) is int and type(size) is int and type(raw_offset) is int and type(raw_size) is int
        and type(pass_index) is int and type(sha) is bytes and len(sha) == SHA256_SIZE_BYTES and codec == _ZSTD
        and 0 <= layer <= MAX_STORE_SIZE_BYTES and 0 <= offset <= MAX_STORE_SIZE_BYTES and 0 < size <= MAX_CHUNK_SIZE_BYTES
        and 0 <= raw_offset <= MAX_STORE_SIZE_BYTES and 0 < raw_size <= chunk_size_bytes and 0 <= pass_index <= MAX_PASS
    ):  # fmt: skip
        return ChunkEntry(index, layer, offset, size, raw_offset, raw_size, sha, pass_index)
    return _parse_chunk_checked(index, item, chunk_size_bytes)


_ZSTD = Codec.ZSTD.value
_CHUNK_VALUES = operator.itemgetter(*CHUNK_FIELDS)  # a mapping's values of CHUNK_FIELDS, in their order
*_SIZE_FIELDS, _SHA256_FIELD = CHUNK_FIELDS
# the largest value of each size field (the raw size is then checked against the manifest's chunk_size)
_SIZE_LIMITS = (MAX_STORE_SIZE_BYTES, MAX_STORE_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES, MAX_STORE_SIZE_BYTES, MAX_CHUNK_RAW_SIZE_BYTES)


def _parse_chunk_checked(index: int, item: Any, chunk_size_bytes: int) -> ChunkEntry:
    """Field by field, raising the error that names what is wrong."""
    where = f"chunks[{index}]"
    item = get_map(item, where)
    sha = get(item, _SHA256_FIELD, bytes, where)
    if len(sha) != SHA256_SIZE_BYTES:
        raise ManifestSchemaError(f"manifest {where}: sha256 must be {SHA256_SIZE_BYTES} bytes, got {len(sha)}")
    codec = get(item, CHUNK_CODEC_FIELD, str, where, default=_ZSTD)
    if codec != _ZSTD:
        raise ManifestSchemaError(f"manifest {where}: unknown chunk codec {codec!r}; upgrade streamload")
    sizes = [get_size(item, key, where, limit=limit) for key, limit in zip(_SIZE_FIELDS, _SIZE_LIMITS, strict=True)]
    chunk = ChunkEntry(index, *sizes, sha256=sha, pass_index=get_size(item, CHUNK_PASS_FIELD, where, limit=MAX_PASS, default=BASE_PASS))
    if chunk.size_bytes == 0 or chunk.raw_size_bytes == 0:
        raise ManifestSchemaError(f"manifest {where}: empty chunks are not allowed")
    if chunk.raw_size_bytes > chunk_size_bytes:
        raise ManifestSchemaError(f"manifest {where}: raw_size {chunk.raw_size_bytes} is over the manifest's chunk_size {chunk_size_bytes}")
    raise AssertionError(f"manifest {where}: the fast path refused a valid chunk")  # pragma: no cover


def parse_chunks(
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


def check_refinements(tensors: tuple[TensorEntry, ...], refinements: tuple[ChunkEntry, ...], base: ChunkTable) -> None:
    """REFINEMENT_PASS chunks tile every progressive tensor exactly, each inside one, and each lies in the file after
    every pass-0 chunk it refines (FORMAT.md, "Progressive tensors"): a reader of the file front to back has the coarse
    levels before their refinement. ``base``: the pass-0 chunks, ascending in the file and in the store."""
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
    refining = [chunk for chunk in refinements if chunk.pass_index == REFINEMENT_PASS]
    if not refining:
        return
    # the last pass-0 chunk under each refinement is the latest of them in the file (pass 0 ascends in both orders)
    ends = np.array([chunk.raw_end for chunk in refining], np.int64)
    offsets = np.array([chunk.offset for chunk in refining], np.int64)
    last_base = np.searchsorted(base.raw_offset, ends, side="left") - 1  # a refinement lies inside a layer: never -1
    early = np.flatnonzero(base.offset[last_base] > offsets)
    if len(early):
        chunk = refining[int(early[0])]
        raise ManifestSchemaError(
            f"manifest chunks[{chunk.index}]: refinement at file offset {chunk.offset} comes before chunk "
            f"{int(base.index[last_base[early[0]]])}, which it refines; a refinement follows its coarse levels in the file"
        )


# The writer's encoding of a chunk entry (encode_manifest): a 6-key map, keys in this order, each value a
# non-negative msgpack int but the sha256, a 32-byte bin. A list of such entries is read for the whole list at
# once with numpy (~0.15 us per entry instead of ~5); anything else (other keys, another order, a `pass`) is
# parsed entry by entry, and so is a list this reading finds anything wrong with, to raise the precise error.
_CHUNK_KEYS = [msgpack.packb(key) for key in CHUNK_FIELDS]
_SHA256_BIN_HEADER = bytes([0xC4, SHA256_SIZE_BYTES])
_CHUNK_OPENING = np.frombuffer(b"\x86" + _CHUNK_KEYS[0], np.uint8)  # a map of 6 whose first key is "layer"
_SCAN_BLOCK_BYTES = 1 << 20
_MIN_CHUNK_ENTRY_BYTES = 1 + sum(map(len, _CHUNK_KEYS)) + 5 * 1 + 2 + SHA256_SIZE_BYTES  # every int in one byte
_MAX_CHUNK_ENTRY_BYTES = _MIN_CHUNK_ENTRY_BYTES + 5 * 8  # every int in nine
_INT_WIDTH = np.full(256, -1, np.int64)  # by first byte: the bytes after it of a non-negative msgpack int (-1: not one)
_INT_WIDTH[:0x80], _INT_WIDTH[0xCC], _INT_WIDTH[0xCD], _INT_WIDTH[0xCE], _INT_WIDTH[0xCF] = 0, 1, 2, 4, 8
_INT_SHIFT = (8 * (8 - np.clip(_INT_WIDTH, 1, 8))).astype(np.uint64)  # of the 8 bytes read after the first byte


def parse_chunks_canonical(
    data: bytes, byte_range: ByteRange, layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> ChunkTable | None:
    """The chunk list when every entry has the writer's encoding and every rule of ``parse_chunks`` holds, else None.
    Columns only: no ChunkEntry is made here (``ChunkTable.entries`` makes them when someone asks)."""
    columns = _chunk_columns(data, byte_range, layers, data_size_bytes, chunk_size_bytes)
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
    data: bytes, byte_range: ByteRange, layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> np.ndarray | None:
    """(layer, offset, size, raw_offset, raw_size, where the sha256 starts in ``data``) of every entry, as rows of an
    array; None when an entry is not in the writer's encoding or a rule of ``parse_chunks`` does not hold.

    Only bytes are read (nothing is decoded), and no array is longer than the list's count, itself at most
    its bytes / 85. Entries are found by their first bytes (a fixmap of 6, then "layer") and must then tile
    the list exactly, so a look-alike inside a sha256 only sends the list to the entry-by-entry path.
    """
    header = _list_header(data, byte_range)
    if header is None:
        return None
    count, body = header
    whole = np.frombuffer(data, np.uint8, byte_range[1] - body, body)
    starts = _entry_starts(whole, count)
    if starts is None:
        return None
    entries = _read_entries(whole, starts)
    if entries is None:
        return None
    fields, sha_at = entries
    columns = _checked_columns(fields, layers, data_size_bytes, chunk_size_bytes)
    if columns is None:
        return None
    return np.stack([*columns, sha_at + body])


def _list_header(data: bytes, byte_range: ByteRange) -> tuple[int, int] | None:
    """(entry count, where the first entry starts) of the msgpack array at ``byte_range``; None for another type, no
    entries, or a count the list's bytes cannot hold in the writer's encoding."""
    start, end = byte_range
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
    return count, body


def _read_entries(whole: np.ndarray, starts: np.ndarray) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Every entry's five sizes (uint64 columns, in ``CHUNK_FIELDS`` order) and where its sha256 starts in ``whole``,
    read at once from the entries opening at ``starts``; None unless every key and int is the writer's and the
    entries tile the list exactly."""
    list_bytes = len(whole)
    ok = np.ones(len(starts), bool)
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
    return fields, sha_at


def _checked_columns(
    fields: list[np.ndarray], layers: tuple[LayerEntry, ...], data_size_bytes: int | None, chunk_size_bytes: int
) -> tuple[np.ndarray, ...] | None:
    """The five sizes as int64 columns when ``parse_chunks``'s rules hold (limits, no empty chunk, a known layer, file
    order inside the data region, pass 0 tiling the layers), else None."""
    limits = [*_SIZE_LIMITS[:-1], chunk_size_bytes]
    if any((field > np.uint64(limit)).any() for field, limit in zip(fields, limits, strict=True)):
        return None
    layer, offset, size, raw_offset, raw_size = (field.astype(np.int64) for field in fields)
    if (size == 0).any() or (raw_size == 0).any() or (layer >= len(layers)).any():
        return None
    chunk_end = offset + size  # file order: ascending, no overlap, inside the data region
    if (offset[1:] < chunk_end[:-1]).any() or (data_size_bytes is not None and (chunk_end > data_size_bytes).any()):
        return None
    if not _tiles_layers(layer, raw_offset, raw_size, layers):
        return None
    return layer, offset, size, raw_offset, raw_size


def _tiles_layers(layer: np.ndarray, raw_offset: np.ndarray, raw_size: np.ndarray, layers: tuple[LayerEntry, ...]) -> bool:
    """Pass 0 tiles every layer exactly, layer after layer (FORMAT.md, "Chunks"); an empty layer has no chunks."""
    layer_offsets = np.array([entry.raw_offset for entry in layers], np.int64)
    layer_ends = np.array([entry.raw_end for entry in layers], np.int64)
    filled = np.flatnonzero(layer_ends > layer_offsets)
    first_of_layer = np.ones(len(layer), bool)
    first_of_layer[1:] = layer[1:] != layer[:-1]
    last_of_layer = np.roll(first_of_layer, -1)
    follows = np.concatenate([[0], raw_offset[:-1] + raw_size[:-1]])
    return (
        np.array_equal(layer[first_of_layer], filled)
        and not (raw_offset != np.where(first_of_layer, layer_offsets[layer], follows)).any()
        and np.array_equal((raw_offset + raw_size)[last_of_layer], layer_ends[filled])
    )
