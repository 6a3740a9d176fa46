"""A chunk's bytes verified and decoded.

From anywhere (a file, an HTTP body): checked against its sha256, its zstd frame checked against the manifest's
sizes, then decompressed; one chunk at a time, or a batch of small ones with numpy (no Python object
per chunk). A chunk that fails any check raises before a byte of it is used."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np
import zstandard

from ..errors import (
    ChunkDecodeError,
    ChunkIntegrityError,
    ChunkSizeError,
    UsageError,
)
from .manifest import ChunkEntry


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
        ChunkDecodeError: the bytes do not hold one whole frame.
    """
    if bytes(data[:4]) != _ZSTD_MAGIC:
        raise ChunkDecodeError("no zstd frame magic")
    try:
        position = zstandard.frame_header_size(data)
    except zstandard.ZstdError as exc:
        raise ChunkDecodeError(str(exc)) from None
    end = len(data)
    while True:
        if position + _ZSTD_BLOCK_HEADER_SIZE_BYTES > end:
            raise ChunkDecodeError("the frame is truncated")
        header = data[position] | data[position + 1] << 8 | data[position + 2] << 16
        block_type = (header >> 1) & 3
        if block_type == 3:
            raise ChunkDecodeError("reserved block type")
        position += _ZSTD_BLOCK_HEADER_SIZE_BYTES + (1 if block_type == 1 else header >> 3)
        if header & 1:
            break
    if data[4] & 0x04:  # Content_Checksum_flag in the frame header descriptor
        position += _ZSTD_CHECKSUM_SIZE_BYTES
    if position > end:
        raise ChunkDecodeError("the frame is truncated")
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
    except (zstandard.ZstdError, ChunkDecodeError) as exc:
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

    Raises:
        ChunkSizeError, ChunkDecodeError: as ``check_frame``, for the first chunk that fails.
        UsageError: ``data`` is not exactly the chunks' bytes back to back.
    """
    sizes = np.array([chunk.size_bytes for chunk in chunks], np.int64)
    _check_frames(chunks, data, sizes, np.array([chunk.raw_size_bytes for chunk in chunks], np.int64))


def _check_frames(chunks: Sequence[ChunkEntry], data: bytes | memoryview, sizes: np.ndarray, raw_sizes: np.ndarray) -> None:
    # few numpy calls per batch, each over every frame: a call may hand the GIL to another thread, and getting it
    # back costs up to the switch interval when the pool is busy
    count = len(chunks)
    starts = np.cumsum(sizes) - sizes
    if count == 0 or starts[-1] + sizes[-1] != len(data):
        raise UsageError(f"{len(data)} bytes do not hold exactly these {count} chunks")
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
        UsageError: ``out`` is not exactly raw_size_bytes long.
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
        raise UsageError(f"output buffer is {len(out)} bytes, chunk needs {expected}")
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
