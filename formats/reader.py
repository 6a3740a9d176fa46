"""Read .slm files: the preamble, the manifest, and chunks (verify, then decompress).

The functions here work on bytes from anywhere (a local file, an HTTP body);
``ModelReader`` adds a memory-mapped local file on top of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import zstandard

from ..errors import (
    BadMagicError,
    ChunkDecodeError,
    ChunkIntegrityError,
    ChunkSizeError,
    FormatError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    UnsupportedVersionError,
)
from .constants import (
    DATA_ALIGNMENT,
    FORMAT_VERSION,
    MAGIC,
    MAX_MANIFEST_SIZE_BYTES,
    PREAMBLE,
    PREAMBLE_SIZE_BYTES,
    READABLE_FORMAT_VERSIONS,
    QuantScheme,
    align_up,
)
from .manifest import ChunkEntry, Manifest, TensorEntry, parse_manifest
from .quantize import fold_refinement


@dataclasses.dataclass(frozen=True, slots=True)
class Preamble:
    """The fixed 32 bytes at the start of every .slm file."""

    format_version: int
    manifest_size_bytes: int
    data_offset: int


def read_preamble(data: bytes | memoryview) -> Preamble:
    """Parse and validate the first PREAMBLE_SIZE_BYTES of a file.

    Raises:
        BadMagicError, UnsupportedVersionError, ManifestTooLargeError, ManifestSchemaError.
    """
    if len(data) < PREAMBLE_SIZE_BYTES:
        raise BadMagicError(f"file is {len(data)} bytes, shorter than the {PREAMBLE_SIZE_BYTES}-byte .slm preamble")
    magic, version, flags, manifest_size, data_offset = PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise BadMagicError(f"not a streamload .slm file (magic {bytes(magic)!r}); convert the model with `streamload convert`")
    if version not in READABLE_FORMAT_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_FORMAT_VERSIONS)
        raise UnsupportedVersionError(f"file has format version {version}; this streamload reads versions {readable}: upgrade streamload")
    if flags != 0:
        raise UnsupportedVersionError(f"file sets preamble flags {flags:#x}, unknown to this reader; upgrade streamload")
    if manifest_size > MAX_MANIFEST_SIZE_BYTES:
        raise ManifestTooLargeError(f"manifest is {manifest_size} bytes, over the {MAX_MANIFEST_SIZE_BYTES}-byte limit")
    expected_offset = align_up(PREAMBLE_SIZE_BYTES + manifest_size, DATA_ALIGNMENT)
    if data_offset != expected_offset:
        raise ManifestSchemaError(f"preamble data_offset {data_offset} should be {expected_offset}; the file is damaged")
    return Preamble(format_version=version, manifest_size_bytes=manifest_size, data_offset=data_offset)


def read_header(data: bytes | memoryview, file_size_bytes: int | None) -> tuple[Preamble, Manifest]:
    """Parse the preamble and manifest from the start of a file of ``file_size_bytes``.

    ``data`` must hold at least the first ``32 + manifest_size_bytes`` bytes; use
    ``header_size_needed`` on the first 32 bytes to learn how many. ``file_size_bytes``
    None skips the check that chunks lie inside the file (a header we validated before).

    Raises:
        FormatError: any malformation, including chunks that point past the end of the file.
    """
    preamble = read_preamble(data[:PREAMBLE_SIZE_BYTES])
    manifest_end = PREAMBLE_SIZE_BYTES + preamble.manifest_size_bytes
    if file_size_bytes is not None and preamble.data_offset > file_size_bytes:
        raise OutOfBoundsError(f"the manifest runs past the end of the file ({file_size_bytes} bytes); the file is truncated")
    if len(data) < manifest_end:
        raise OutOfBoundsError(f"need {manifest_end} header bytes, got {len(data)}")
    data_size = None if file_size_bytes is None else file_size_bytes - preamble.data_offset
    manifest = parse_manifest(memoryview(data)[PREAMBLE_SIZE_BYTES:manifest_end], data_size_bytes=data_size)  # copied once, there
    return preamble, manifest


def header_size_needed(data: bytes | memoryview) -> int:
    """How many bytes from the start of the file hold preamble + manifest (from the first 32)."""
    return PREAMBLE_SIZE_BYTES + read_preamble(data).manifest_size_bytes


def encode_preamble(manifest_size_bytes: int, format_version: int | None = None) -> bytes:
    """The preamble for a manifest of this size (used by the writer and golden tests); FORMAT_VERSION by default."""
    data_offset = align_up(PREAMBLE_SIZE_BYTES + manifest_size_bytes, DATA_ALIGNMENT)
    return PREAMBLE.pack(MAGIC, FORMAT_VERSION if format_version is None else format_version, 0, manifest_size_bytes, data_offset)


def verify_chunk(chunk: ChunkEntry, data: bytes | memoryview) -> None:
    """Check a chunk's compressed bytes against the manifest's sha256.

    Raises:
        ChunkIntegrityError: naming the layer and chunk; the bytes must be discarded.
    """
    if len(data) != chunk.size_bytes:
        raise ChunkIntegrityError(
            f"chunk {chunk.index} of layer {chunk.layer_index}: got {len(data)} bytes, expected {chunk.size_bytes}",
            layer_index=chunk.layer_index,
            chunk_index=chunk.index,
        )
    if hashlib.sha256(data).digest() != chunk.sha256:
        raise ChunkIntegrityError(
            f"chunk {chunk.index} of layer {chunk.layer_index}: sha256 mismatch; the bytes were damaged in transit or on disk",
            layer_index=chunk.layer_index,
            chunk_index=chunk.index,
        )


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZSTD_BLOCK_HEADER_SIZE_BYTES = 3
_ZSTD_CHECKSUM_SIZE_BYTES = 4


def frame_size_bytes(data: bytes | memoryview) -> int:
    """Length of the zstd frame that starts ``data``, walked from its block headers (nothing is decompressed).

    A frame is a header, blocks (3-byte header: last-block bit, 2-bit type, 21-bit size; an RLE
    block carries 1 byte, a raw or compressed block ``size`` bytes), then an optional 4-byte checksum.

    Raises:
        ValueError: the bytes do not hold one whole frame.
    """
    if bytes(data[:4]) != _ZSTD_MAGIC:
        raise ValueError("no zstd frame magic")
    position = zstandard.frame_header_size(data)
    end = len(data)
    while True:
        if position + _ZSTD_BLOCK_HEADER_SIZE_BYTES > end:
            raise ValueError("the frame is truncated")
        header = data[position] | data[position + 1] << 8 | data[position + 2] << 16
        block_type = (header >> 1) & 3
        if block_type == 3:
            raise ValueError("reserved block type")
        position += _ZSTD_BLOCK_HEADER_SIZE_BYTES + (1 if block_type == 1 else header >> 3)
        if header & 1:
            break
    if data[4] & 0x04:  # Content_Checksum_flag in the frame header descriptor
        position += _ZSTD_CHECKSUM_SIZE_BYTES
    if position > end:
        raise ValueError("the frame is truncated")
    return position


def check_frame(chunk: ChunkEntry, data: bytes | memoryview) -> None:
    """The chunk's bytes are exactly one zstd frame that declares the manifest's raw size (nothing decompressed).

    Raises:
        ChunkSizeError: the frame declares another size.
        ChunkDecodeError: the bytes are not exactly one zstd frame.
    """
    try:
        declared = zstandard.frame_content_size(data)
        frame_size = frame_size_bytes(data)
    except (zstandard.ZstdError, ValueError) as exc:
        raise ChunkDecodeError(f"{_where(chunk)} is not a zstd frame ({exc})") from None
    if frame_size != len(data):
        raise ChunkDecodeError(f"{_where(chunk)} has {len(data) - frame_size} bytes after its zstd frame; a chunk is exactly one frame")
    if declared != chunk.raw_size_bytes:
        raise ChunkSizeError(f"{_where(chunk)} declares {declared} raw bytes, the manifest says {chunk.raw_size_bytes}")


def _where(chunk: ChunkEntry) -> str:
    return f"chunk {chunk.index} of layer {chunk.layer_index}"


def _descriptor_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """By Frame_Header_Descriptor byte (RFC 8878 section 3.1.1.1.1): where the content size field starts, its width
    (0: absent, or the reserved bit set), where the first block header starts, and the checksum's size."""
    descriptor = np.arange(256)
    content_size_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    field_at = 5 + (1 - single_segment) + np.array([0, 1, 2, 4])[descriptor & 3]  # magic, descriptor, window, dictionary
    field_size = np.where(content_size_flag == 0, single_segment, 1 << content_size_flag)  # 1 (single segment), 2, 4, 8
    field_size = np.where(descriptor & 0x08, 0, field_size)  # the reserved bit
    return field_at, field_size, field_at + field_size, 4 * ((descriptor >> 2) & 1)


_FIELD_AT, _FIELD_SIZE, _BLOCK_AT, _CHECKSUM_SIZE = _descriptor_tables()
_WINDOW_BYTES = 21  # the longest frame header (18 bytes) and a block header
_MAGIC_LE = np.uint64(int.from_bytes(_ZSTD_MAGIC, "little"))
_FIELD_MASK = ((1 << (8 * _FIELD_SIZE.astype(object))) - 1).astype(np.uint64)  # the content size field's bytes of 8
_FIELD_BIAS = np.where(_FIELD_SIZE == 2, 256, 0).astype(np.uint64)  # a 2-byte field counts from 256


def check_frames(chunks: list[ChunkEntry], data: bytes | memoryview) -> None:
    """``check_frame`` for chunks whose bytes lie back to back in ``data``, read with numpy for the whole batch.

    A frame of one block (every small chunk) is checked here from its header and block
    header (RFC 8878 sections 3.1.1.1 and 3.1.1.2): magic, no reserved bit, a declared
    content size equal to the manifest's raw size, and the frame ending exactly where the
    chunk does. Any other frame goes to ``check_frame``, which accepts it or raises its error.
    """
    sizes = np.array([chunk.size_bytes for chunk in chunks], np.int64)
    _check_frames(chunks, data, sizes, np.array([chunk.raw_size_bytes for chunk in chunks], np.int64))


def _check_frames(chunks: Sequence[ChunkEntry], data: bytes | memoryview, sizes: np.ndarray, raw_sizes: np.ndarray) -> None:
    # few numpy calls per batch, each over every frame: a call may hand the GIL to another thread, and getting it
    # back costs up to the switch interval when the pool is busy
    count = len(chunks)
    starts = np.cumsum(sizes) - sizes
    if count == 0 or starts[-1] + sizes[-1] != len(data):
        raise ValueError(f"{len(data)} bytes do not hold exactly these {count} chunks")
    buffer = np.zeros(len(data) + _WINDOW_BYTES + 8, np.uint8)  # padded: a short frame's reads stay inside
    buffer[: len(data)] = np.frombuffer(data, np.uint8)
    # the 8 (4) bytes from each byte on as one little-endian integer (unaligned views, no copy): a read per field
    u64 = np.ndarray((len(buffer) - 7,), "<u8", buffer, strides=(1,))
    u32 = np.ndarray((len(buffer) - 3,), "<u4", buffer, strides=(1,))
    head = u64[starts]  # magic (4 bytes), descriptor, ...
    descriptor = ((head >> np.uint64(32)) & np.uint64(0xFF)).astype(np.uint8)
    field_size, block_at = _FIELD_SIZE[descriptor], _BLOCK_AT[descriptor]
    declared = (u64[starts + _FIELD_AT[descriptor]] & _FIELD_MASK[descriptor]) + _FIELD_BIAS[descriptor]  # the content size
    block = (u32[starts + block_at] & np.uint32(0xFFFFFF)).astype(np.int64)
    block_type = (block >> 1) & 3
    frame_end = block_at + 3 + np.where(block_type == 1, 1, block >> 3) + _CHECKSUM_SIZE[descriptor]
    fast = (
        ((head & np.uint64(0xFFFFFFFF)) == _MAGIC_LE)
        & (field_size > 0)  # the size is declared (and the reserved bit is clear)
        & (declared == raw_sizes.astype(np.uint64))
        & (block & 1 == 1)  # the last block
        & (block_type != 3)
        & (frame_end == sizes)
    )
    if not fast.all():
        view = memoryview(data)
        for position in np.flatnonzero(~fast).tolist():
            start = int(starts[position])
            check_frame(chunks[position], view[start : start + chunks[position].size_bytes])


def decompress_chunk(
    chunk: ChunkEntry,
    data: bytes | memoryview,
    out: memoryview | bytearray | None = None,
    *,
    decompressor: zstandard.ZstdDecompressor | None = None,
) -> bytes | memoryview | bytearray:
    """Decompress one verified chunk into ``out`` (exactly raw_size_bytes long) or new bytes.

    ``decompressor``: a context to reuse (one per thread: contexts are not thread-safe).

    The output can never exceed the manifest's raw size: the frame must declare
    exactly that size before anything is allocated, and decoding into ``out``
    stops at its end (no decompression bombs).

    Raises:
        ChunkSizeError: the frame declares or yields another size.
        ChunkDecodeError: the bytes are not exactly one zstd frame (trailing bytes are refused: one
            walk over the block headers, ~1 us per MiB chunk).
    """
    expected = chunk.raw_size_bytes
    check_frame(chunk, data)
    if out is None:
        # One-shot: a single GIL release for the whole frame. Safe against bombs because the
        # frame header's content size was checked above and libzstd fails a frame whose
        # content differs from its header; the allocation is exactly ``expected`` bytes.
        try:
            raw = (decompressor or zstandard.ZstdDecompressor()).decompress(data)
        except zstandard.ZstdError as exc:
            raise ChunkDecodeError(f"chunk {chunk.index} of layer {chunk.layer_index} failed to decompress ({exc})") from None
        if len(raw) != expected:
            raise ChunkSizeError(f"chunk {chunk.index} of layer {chunk.layer_index} decompressed to {len(raw)} bytes, expected {expected}")
        return raw
    if len(out) != expected:
        raise ValueError(f"output buffer is {len(out)} bytes, chunk needs {expected}")
    try:
        with (decompressor or zstandard.ZstdDecompressor()).stream_reader(data, read_across_frames=False) as frame:
            view = memoryview(out)
            filled = 0
            while filled < expected:
                n = frame.readinto(view[filled:])
                if n == 0:
                    break
                filled += n
            extra = frame.read(1)
    except zstandard.ZstdError as exc:
        raise ChunkDecodeError(f"chunk {chunk.index} of layer {chunk.layer_index} failed to decompress ({exc})") from None
    if filled != expected or extra:
        raise ChunkSizeError(
            f"chunk {chunk.index} of layer {chunk.layer_index} decompressed to {'more' if extra else filled} bytes, expected {expected}"
        )
    return out


def decompress_chunks(
    chunks: list[ChunkEntry], pieces: list[memoryview], *, decompressor: zstandard.ZstdDecompressor | None = None
) -> list[bytes | memoryview]:
    """Decompress verified chunks (small ones, many at a time) with one call into libzstd.

    The same guarantees as ``decompress_chunk``: each frame must declare exactly its
    manifest raw size, be exactly one frame with nothing after it, and decode to that size.
    One call means one release of the GIL for the whole batch instead of one per chunk.
    """
    if len(chunks) == 1:
        return [decompress_chunk(chunks[0], pieces[0], decompressor=decompressor)]
    for chunk, piece in zip(chunks, pieces, strict=True):
        check_frame(chunk, piece)
    sizes = struct.pack(f"={len(chunks)}Q", *(chunk.raw_size_bytes for chunk in chunks))
    try:
        result = (decompressor or zstandard.ZstdDecompressor()).multi_decompress_to_buffer(pieces, decompressed_sizes=sizes)
    except zstandard.ZstdError:  # name the chunk that failed
        return [decompress_chunk(chunk, piece, decompressor=decompressor) for chunk, piece in zip(chunks, pieces, strict=True)]
    return [result[i] for i in range(len(chunks))]


def decompress_batch(
    chunks: Sequence[ChunkEntry],
    data: bytes | memoryview,
    *,
    decompressor: zstandard.ZstdDecompressor | None = None,
    sizes: np.ndarray | None = None,
    raw_sizes: np.ndarray | None = None,
) -> list[bytes | memoryview]:
    """``decompress_chunks`` for verified chunks whose bytes lie back to back in ``data``: the frames are checked
    for the whole batch at once (``check_frames``) and decoded with one call into libzstd, with no Python
    work per chunk beyond taking its output. ``sizes`` and ``raw_sizes`` (int64), when given, are the chunks'
    (a ``ChunkTable``'s columns): ``chunks`` is then indexed only to name a chunk that fails."""
    if len(chunks) == 1:
        return [decompress_chunk(chunks[0], data, decompressor=decompressor)]
    if sizes is None or raw_sizes is None:
        sizes = np.array([chunk.size_bytes for chunk in chunks], np.int64)
        raw_sizes = np.array([chunk.raw_size_bytes for chunk in chunks], np.int64)
    _check_frames(chunks, data, sizes, raw_sizes)
    segments = np.stack([np.cumsum(sizes) - sizes, sizes], axis=1).astype("<u8")  # (offset, length) of each frame
    try:
        result = (decompressor or zstandard.ZstdDecompressor()).multi_decompress_to_buffer(
            zstandard.BufferWithSegments(data, segments.tobytes()), decompressed_sizes=raw_sizes.astype("=u8").tobytes()
        )
    except zstandard.ZstdError:  # name the chunk that failed
        view = memoryview(data)
        starts = segments[:, 0].tolist()
        return [
            decompress_chunk(chunk, view[start : start + chunk.size_bytes], decompressor=decompressor)
            for chunk, start in zip(chunks, starts, strict=True)
        ]
    return [result[i] for i in range(len(chunks))]


def view_tensor(store: memoryview | np.ndarray | mmap.mmap, entry: TensorEntry, base_offset: int = 0) -> np.ndarray:
    """A zero-copy numpy view of one tensor inside a buffer holding the layer store from ``base_offset``."""
    start = entry.raw_offset - base_offset
    return np.frombuffer(store, dtype=entry.dtype.numpy_name, count=int(np.prod(entry.shape, dtype=np.int64)), offset=start).reshape(
        entry.shape
    )


def dequantize(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 values of an INT8_ROW tensor (a copy; the runtime avoids this for whole models)."""
    return weight.astype(np.float32) * scales[:, None]


def _error_fields(exc: FormatError) -> dict[str, int]:
    if isinstance(exc, ChunkIntegrityError):
        return {"layer_index": exc.layer_index, "chunk_index": exc.chunk_index}
    return {}


class ModelReader:
    """A local .slm file, memory-mapped read-only.

    Example:
        >>> with ModelReader("model.slm") as reader:          # doctest: +SKIP
        ...     print(reader.manifest.architecture, len(reader.manifest.layers))
        ...     reader.verify()
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PREAMBLE_SIZE_BYTES:
                raise BadMagicError(f"{self.path} is {size} bytes, too short to be a .slm file")
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            self._view = memoryview(self._mmap)
            self.preamble, self.manifest = read_header(self._view, size)
        except FormatError as exc:
            self.close()
            raise type(exc)(f"{self.path}: {exc}", **_error_fields(exc)) from None
        except BaseException:
            self.close()
            raise
        self.size_bytes = size

    def close(self) -> None:
        view = getattr(self, "_view", None)
        if view is not None:
            view.release()
        try:
            self._mmap.close()
        except BufferError:  # a caller still holds a view; the map closes when it is collected
            pass

    def __enter__(self) -> ModelReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chunk_bytes(self, chunk: ChunkEntry) -> memoryview:
        """The compressed bytes of a chunk, zero-copy."""
        start = self.preamble.data_offset + chunk.offset
        return self._view[start : start + chunk.size_bytes]

    def read_chunk(self, chunk: ChunkEntry, out: memoryview | bytearray | None = None) -> memoryview | bytearray:
        """Verify then decompress one chunk."""
        data = self.chunk_bytes(chunk)
        verify_chunk(chunk, data)
        return decompress_chunk(chunk, data, out)

    def read_layer(self, layer_index: int, *, coarse: bool = False) -> bytearray:
        """The decompressed bytes of one layer (a copy in memory): exact, or (``coarse``) progressive tensors at their
        coarse levels, without their refinements."""
        layer = self.manifest.layers[layer_index]
        buffer = bytearray(layer.raw_size_bytes)
        view = memoryview(buffer)
        for chunk in self.manifest.chunks_of_layer(layer_index):
            start = chunk.raw_offset - layer.raw_offset
            self.read_chunk(chunk, view[start : start + chunk.raw_size_bytes])
        if not coarse:
            for chunk in self.manifest.refinements_of_layer(layer_index):
                start = chunk.raw_offset - layer.raw_offset
                stored = np.frombuffer(buffer, np.int8, chunk.raw_size_bytes, start)
                refinement = np.frombuffer(self.read_chunk(chunk), np.int8)
                stored[:] = fold_refinement(stored, refinement, self._shift_at(chunk.raw_offset))
        return buffer

    def _shift_at(self, raw_offset: int) -> int:
        """The coarse_shift of the progressive tensor holding this store offset (the manifest checked there is one)."""
        for tensor in self.manifest.tensors:
            if tensor.coarse_shift is not None and tensor.raw_offset <= raw_offset < tensor.raw_end:
                return tensor.coarse_shift
        raise AssertionError(f"no progressive tensor at store offset {raw_offset}")  # pragma: no cover - parse_manifest checked

    def read_tensors(self, layer_index: int, *, coarse: bool = False) -> dict[str, np.ndarray]:
        """Every tensor of a layer as numpy arrays over one decompressed buffer (``coarse``: see ``read_layer``)."""
        layer = self.manifest.layers[layer_index]
        buffer = self.read_layer(layer_index, coarse=coarse)
        return {t.name: view_tensor(buffer, t, layer.raw_offset) for t in self.manifest.tensors_of_layer(layer_index)}

    def read_dequantized(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 values) for every tensor but scales, layer by layer."""
        scale_names = {t.scales for t in self.manifest.tensors if t.scales}
        scales_seen: dict[str, np.ndarray] = {}  # a row table's scales live in an earlier layer
        for layer in self.manifest.layers:
            tensors = self.read_tensors(layer.index)
            for entry in self.manifest.tensors_of_layer(layer.index):
                if entry.name in scale_names:
                    scales_seen[entry.name] = tensors[entry.name]
            for entry in self.manifest.tensors_of_layer(layer.index):
                if entry.name in scale_names:
                    continue
                values = tensors[entry.name]
                if entry.quant is QuantScheme.INT8_ROW:
                    values = dequantize(values, scales_seen[entry.scales or ""])
                yield entry.name, values.astype(np.float32, copy=False)

    def verify(self) -> list[FormatError]:
        """Check every chunk's hash and decoded size; returns the problems found (empty when intact)."""
        problems: list[FormatError] = []
        for chunk in self.manifest.chunks + self.manifest.refinement_chunks:
            try:
                self.read_chunk(chunk)
            except FormatError as exc:
                problems.append(exc)
        return problems
