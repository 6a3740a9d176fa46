"""Delta files: what a client holding one version of a model needs to rebuild the next (FORMAT.md, "Delta files").

A delta file (``.slmd``) is written beside a new model file by ``convert --base OLD``. Against the base (the old
version, named by its manifest digest) it holds, for every pass-0 chunk of the new model that the base does not list
by sha256 (those a client copies from its cache), either the chunk's own zstd frame (``DeltaMethod.WHOLE``) or a zstd
frame of the byte-wise difference new - base (mod 256) over the chunk's range of the base's layer store
(``DeltaMethod.DIFFERENCE``; for int8 weights that is the difference of the codes). Each entry carries the sha256 of
the chunk's raw bytes (of its frame, for a whole chunk), so that what a client rebuilds is checked before it is used;
the new model's manifest lists each base with the sha256 of the delta file's index (preamble and entries), so that
the index, and through it every rebuilt chunk, is pinned by the new model's digest.

The layout is declared here and nowhere else (``DELTA_PREAMBLE``, ``DELTA_ENTRY``); everything is little-endian.

``quantize_like`` quantizes a new matrix with the base's per-row scales where that keeps the error within
``REBASE_MAX_SCALE_RATIO`` of independent quantization's, so that codes that did not move stay equal; ``write_delta``
plans and writes the file and lists it in the new model's manifest (``attach_delta_base``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from ..errors import ChunkIntegrityError, FormatError, ManifestSchemaError
from .constants import DATA_ALIGNMENT, MAX_CHUNK_RAW_SIZE_BYTES, PREAMBLE_SIZE_BYTES, SHA256_SIZE_BYTES, align_up
from .manifest import ChunkEntry, Manifest, parse_manifest
from .msgpack_bounded import decode, map_spans
from .quantize import NO_ERROR, QuantizationReport, quantize_int8_rows

DELTA_MAGIC = b"\x89SLD\r\n\x1a\n"
"""8 bytes, as the model file's MAGIC with D for delta."""

DELTA_VERSION = 1

DELTA_PREAMBLE = struct.Struct(
    "<"
    "8s"  # magic: DELTA_MAGIC
    "I"  # version: DELTA_VERSION
    "I"  # flags: 0 (a reader rejects unknown flags)
    "Q"  # entry_count: entries after the preamble
    "32s"  # base_digest: sha256 of the base model's manifest bytes
)
DELTA_PREAMBLE_SIZE_BYTES = DELTA_PREAMBLE.size  # 56

DELTA_ENTRY = struct.Struct(
    "<"
    "I"  # chunk_index: the new model's pass-0 chunk this entry rebuilds (ascending)
    "I"  # method: DeltaMethod
    "Q"  # base_raw_offset: DIFFERENCE: where the chunk's base bytes start in the base's layer store; WHOLE: 0
    "Q"  # offset: of the entry's zstd frame, from data_offset
    "Q"  # size: the frame's bytes
    "32s"  # sha256: DIFFERENCE: of the rebuilt raw chunk; WHOLE: of the frame (the chunk's sha256 in the manifest)
)
DELTA_ENTRY_SIZE_BYTES = DELTA_ENTRY.size  # 64

MAX_DELTA_ENTRIES = 1 << 24
"""Entries a reader accepts (16 M: a 1 GiB index)."""

DELTA_SUFFIX = ".slmd"

DELTA_ZSTD_LEVEL = 19
"""Difference frames, mostly zeros and small values, are worth the slowest level (written once, by the publisher): on
a fine-tune of all-MiniLM-L6-v2 its difference frames take 2.42 MB at level 19, 2.80 at 9, 3.03 at 3
(``python tools/bench_delta.py``, then the frames recompressed)."""

REBASE_MAX_SCALE_RATIO = 1.25
"""``quantize_like`` keeps a row's base scale s_base when the row fits (max |w| / s_base rounds into [-127, 127]) and
s_base <= this x the row's own scale: its largest error, s_base / 2, is then at most 1.25x independent quantization's
bound of half a step."""

MAX_DELTA_SHARE = 0.9
"""A delta file at least this share of the new model's file is not written: it would save too little."""

DELTA_BASES_KEY = "deltas"
"""The manifest's root key listing the bases a delta file was written against (readers that do not know it ignore it)."""


class DeltaMethod(enum.IntEnum):
    """How an entry's frame rebuilds its chunk."""

    WHOLE = 0  # the chunk's own zstd frame, as in the new model's file
    DIFFERENCE = 1  # zstd of (new raw - base raw) mod 256, byte by byte, over the chunk's range


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaBase:
    """One ``deltas`` entry of a manifest: a delta file against the model with manifest digest ``digest``."""

    digest: str  # hex
    index_sha256: bytes  # of the delta file's bytes [0, data_offset): preamble and entries
    size_bytes: int  # the delta file's size


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaIndex:
    """A delta file's preamble and entries (columns), validated."""

    base_digest: str
    chunk_index: np.ndarray  # int64
    method: np.ndarray
    base_raw_offset: np.ndarray
    offset: np.ndarray
    size: np.ndarray
    sha256: np.ndarray  # (n, 32) uint8

    @property
    def data_offset(self) -> int:
        return delta_data_offset(len(self.chunk_index))

    def __len__(self) -> int:
        return len(self.chunk_index)


def delta_data_offset(entry_count: int) -> int:
    return align_up(DELTA_PREAMBLE_SIZE_BYTES + entry_count * DELTA_ENTRY_SIZE_BYTES, DATA_ALIGNMENT)


def delta_file_name(model_file_name: str, base_digest: str, target_digest: str) -> str:
    """The delta file's name beside the model file: ``minilm.slm`` -> ``minilm.<base 12>-<target 12>.slmd``."""
    stem = model_file_name[: -len(".slm")] if model_file_name.endswith(".slm") else model_file_name
    return f"{stem}.{base_digest[:12]}-{target_digest[:12]}{DELTA_SUFFIX}"


def _entry_dtype() -> np.dtype:
    return np.dtype(
        [("chunk_index", "<u4"), ("method", "<u4"), ("base_raw_offset", "<u8"), ("offset", "<u8"), ("size", "<u8"), ("sha256", "V32")]
    )


def index_size_needed(preamble: bytes | memoryview) -> int:
    """From a delta file's first DELTA_PREAMBLE_SIZE_BYTES: how many bytes hold the preamble and the entries."""
    return DELTA_PREAMBLE_SIZE_BYTES + _read_preamble(preamble)[1] * DELTA_ENTRY_SIZE_BYTES


def _read_preamble(data: bytes | memoryview) -> tuple[str, int]:
    if len(data) < DELTA_PREAMBLE_SIZE_BYTES:
        raise FormatError(f"a delta file starts with {DELTA_PREAMBLE_SIZE_BYTES} bytes of preamble, got {len(data)}")
    magic, version, flags, count, base = DELTA_PREAMBLE.unpack_from(data)
    if magic != DELTA_MAGIC:
        raise FormatError("not a streamload delta file (bad magic)")
    if version != DELTA_VERSION or flags:
        raise FormatError(f"delta file version {version}, flags {flags:#x}: this reader reads version {DELTA_VERSION}; upgrade streamload")
    if count > MAX_DELTA_ENTRIES:
        raise FormatError(f"delta file declares {count} entries, over the {MAX_DELTA_ENTRIES} a reader accepts")
    return bytes(base).hex(), int(count)


def parse_delta_index(data: bytes | memoryview, *, file_size_bytes: int | None = None) -> DeltaIndex:
    """Validate a delta file's preamble and entries (``data`` holds at least ``index_size_needed`` bytes).

    Raises:
        FormatError: bad magic or version; entries out of order, frames that overlap, run past the file or are
            larger than a chunk can be; an unknown method.
    """
    base, count = _read_preamble(data)
    end = DELTA_PREAMBLE_SIZE_BYTES + count * DELTA_ENTRY_SIZE_BYTES
    if len(data) < end:
        raise FormatError(f"the delta index needs {end} bytes, got {len(data)}")
    rows = np.frombuffer(data, _entry_dtype(), count, DELTA_PREAMBLE_SIZE_BYTES)
    chunk_index = rows["chunk_index"].astype(np.int64)
    method = rows["method"].astype(np.int64)
    offset, size = rows["offset"].astype(np.uint64), rows["size"].astype(np.uint64)
    if count:
        if (np.diff(chunk_index) <= 0).any():
            raise FormatError("delta entries must name ascending chunk indices")
        if not np.isin(method, [m.value for m in DeltaMethod]).all():
            raise FormatError("a delta entry has an unknown method; upgrade streamload")
        if (size == 0).any() or (size > np.uint64(2 * MAX_CHUNK_RAW_SIZE_BYTES)).any():
            raise FormatError("a delta entry's frame is empty or larger than a chunk can be")
        ends = offset + size
        if (offset[1:] < ends[:-1]).any():
            raise FormatError("delta frames must be in entry order and must not overlap")
        if file_size_bytes is not None and int(ends[-1]) > file_size_bytes - delta_data_offset(count):
            raise FormatError("a delta frame runs past the end of the delta file; it is truncated")
    sha = np.frombuffer(rows["sha256"].tobytes(), np.uint8).reshape(count, SHA256_SIZE_BYTES)
    return DeltaIndex(
        base_digest=base,
        chunk_index=chunk_index,
        method=method,
        base_raw_offset=rows["base_raw_offset"].astype(np.int64),
        offset=offset.astype(np.int64),
        size=size.astype(np.int64),
        sha256=sha,
    )


def rebuild_chunk(
    chunk: ChunkEntry, method: int, frame: bytes | memoryview, sha256: bytes, base: bytes | memoryview | None
) -> bytes | bytearray:
    """The raw bytes of ``chunk`` from its delta entry, checked: a whole frame against the chunk's sha256, a difference
    (applied to ``base``, the chunk's range of the base's store) against the entry's raw sha256.

    Raises:
        ChunkIntegrityError: a hash differs (a damaged delta file, or the wrong base).
        ChunkDecodeError: the frame is not exactly one zstd frame of the chunk's raw size.
    """
    from .chunks import decompress_chunk, verify_chunk

    if method == DeltaMethod.WHOLE:
        verify_chunk(chunk, frame)
        return decompress_chunk(chunk, frame)
    if base is None or len(base) != chunk.raw_size_bytes:
        raise ChunkIntegrityError(
            f"chunk {chunk.index}: no base bytes to apply its delta to", layer_index=chunk.layer_index, chunk_index=chunk.index
        )
    difference = decompress_chunk(chunk, frame)  # exactly raw_size bytes, or ChunkDecodeError / ChunkSizeError
    rebuilt = bytearray(chunk.raw_size_bytes)
    np.add(np.frombuffer(base, np.uint8), np.frombuffer(difference, np.uint8), out=np.frombuffer(rebuilt, np.uint8))  # wraps mod 256
    if hashlib.sha256(rebuilt).digest() != sha256:
        raise ChunkIntegrityError(
            f"chunk {chunk.index} of layer {chunk.layer_index}: rebuilt from its delta, its sha256 differs; fetching it whole",
            layer_index=chunk.layer_index,
            chunk_index=chunk.index,
        )
    return rebuilt


# ---------------------------------------------------------------- the manifest's list of bases


def read_delta_bases(manifest_bytes: bytes | memoryview) -> list[DeltaBase]:
    """The ``deltas`` root key of a manifest (already parsed and valid otherwise); [] when absent or malformed."""
    data = bytes(manifest_bytes)
    try:
        root = map_spans(data, (0, len(data)), "root")
        if DELTA_BASES_KEY not in root:
            return []
        items = decode(data, root[DELTA_BASES_KEY], DELTA_BASES_KEY, limit_bytes=1 << 20)
    except FormatError:
        return []
    bases = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        digest, index_sha, size = item.get("base"), item.get("index_sha256"), item.get("size")
        if (
            isinstance(digest, bytes)
            and len(digest) == SHA256_SIZE_BYTES
            and isinstance(index_sha, bytes)
            and len(index_sha) == SHA256_SIZE_BYTES
            and isinstance(size, int)
            and not isinstance(size, bool)
            and size > 0
        ):
            bases.append(DeltaBase(digest.hex(), index_sha, size))
    return bases


def attach_delta_base(path: Path, base: DeltaBase) -> Manifest:
    """Rewrite a model file's header so that its manifest lists ``base`` (the data region is copied unchanged: chunk
    offsets count from data_offset). Returns the new manifest; the file is replaced atomically."""
    from .reader import encode_preamble, read_preamble

    with open(path, "rb") as f:
        preamble = read_preamble(f.read(PREAMBLE_SIZE_BYTES))
        manifest_bytes = f.read(preamble.manifest_size_bytes)
        manifest = parse_manifest(manifest_bytes)
        root = msgpack.unpackb(manifest_bytes, raw=False, strict_map_key=False)
        listed = [b for b in root.get(DELTA_BASES_KEY, []) if b.get("base") != bytes.fromhex(base.digest)]
        root[DELTA_BASES_KEY] = listed + [{"base": bytes.fromhex(base.digest), "index_sha256": base.index_sha256, "size": base.size_bytes}]
        encoded = msgpack.packb(root, use_bin_type=True)
        data_size = os.fstat(f.fileno()).st_size - preamble.data_offset
        rewritten = parse_manifest(encoded, data_size_bytes=data_size)
        if rewritten.chunk_table.sha256.tobytes() != manifest.chunk_table.sha256.tobytes():
            raise ManifestSchemaError("rewriting the manifest changed its chunks")  # pragma: no cover - msgpack round trip
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as out:
            header = encode_preamble(len(encoded), preamble.format_version) + encoded
            out.write(header + bytes(align_up(len(header), DATA_ALIGNMENT) - len(header)))
            f.seek(preamble.data_offset)
            shutil.copyfileobj(f, out, 4 << 20)
            out.flush()
            os.fsync(out.fileno())
    os.replace(partial, path)
    return rewritten


# ---------------------------------------------------------------- quantizing against a base


@dataclasses.dataclass(frozen=True, slots=True)
class RebaseReport:
    """One matrix quantized with its base's scales where the error bound allows."""

    name: str
    rows: int
    rows_rebased: int  # rows that kept the base's scale
    error: QuantizationReport  # of the stored codes
    independent: QuantizationReport  # of independent quantization, for comparison


def quantize_like(
    weight: np.ndarray, base_scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray, QuantizationReport, QuantizationReport, int]:
    """Quantize ``weight`` (rows, cols) to int8 reusing ``base_scales`` row by row where that keeps the error bound.

    A row keeps its base scale s_base when max |w| / s_base rounds into [-127, 127] and s_base is at most
    REBASE_MAX_SCALE_RATIO x the row's own scale max |w| / 127 (or the row is all zero); other rows are quantized
    independently. Returns (codes, scales, error, independent quantization's error, rows rebased).
    """
    q, scales, independent = quantize_int8_rows(weight)
    block = np.asarray(weight, dtype=np.float32)
    base_scales = np.asarray(base_scales, np.float32)
    amax = np.abs(block).max(axis=1) if block.shape[1] else np.zeros(len(block), np.float32)
    fits = (base_scales > 0) & (amax <= 127.49 * base_scales)
    keep = fits & ((base_scales <= REBASE_MAX_SCALE_RATIO * scales) | (amax == 0))
    if keep.any():
        rows = np.flatnonzero(keep)
        q[rows] = np.clip(np.rint(block[rows] / base_scales[rows, None]), -127, 127).astype(np.int8)
        scales = scales.copy()
        scales[rows] = base_scales[rows]
    error = block - q.astype(np.float32) * scales[:, None]
    max_abs = float(np.abs(error).max()) if error.size else 0.0
    norms = np.linalg.norm(block, axis=1)
    rel = np.linalg.norm(error, axis=1) / np.where(norms > 0, norms, 1.0)
    return q, scales, QuantizationReport(max_abs, float(rel.max()) if rel.size else 0.0), independent, int(keep.sum())


class BaseScales:
    """The per-row scales of a base model's int8 matrices, by name (read from its file once)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .constants import QuantScheme
        from .reader import ModelReader

        self.path = Path(path)
        self._scales: dict[str, np.ndarray] = {}
        with ModelReader(self.path) as reader:
            self.digest = reader.manifest.digest
            wanted = {t.scales: t for t in reader.manifest.tensors if t.quant is QuantScheme.INT8_ROW and t.scales}
            for layer in reader.manifest.layers:
                names = [t.name for t in reader.manifest.tensors_of_layer(layer.index) if t.name in wanted]
                if names:
                    tensors = reader.read_tensors(layer.index)
                    for name in names:
                        self._scales[wanted[name].name] = np.array(tensors[name], np.float32)
        self.reports: list[RebaseReport] = []

    def quantize(self, name: str, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, QuantizationReport] | None:
        """``quantize_like`` with the base's scales of matrix ``name``; None when the base has no such matrix of that shape."""
        blocks = self.quantize_blocks(name, weight.shape[0] if weight.ndim == 2 else -1, [weight])
        if blocks is None:
            return None
        q, scales, error = next(blocks)
        return q, scales, error

    def quantize_blocks(
        self, name: str, rows: int, blocks: Iterable[np.ndarray], *, record: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray, QuantizationReport]] | None:
        """``quantize_like`` over ``blocks`` of consecutive rows of matrix ``name`` (``rows`` in all), each with the base's
        scales of its rows; None when the base has no such matrix of that many rows. The tensor's report is recorded
        once every block is through."""
        base = self._scales.get(name)
        if base is None or base.shape != (rows,):
            return None

        def each() -> Iterator[tuple[np.ndarray, np.ndarray, QuantizationReport]]:
            start, rebased, error, independent = 0, 0, NO_ERROR, NO_ERROR
            for block in blocks:
                q, scales, block_error, block_independent, block_rebased = quantize_like(block, base[start : start + len(block)])
                start += len(block)
                rebased += block_rebased
                error, independent = error.merged(block_error), independent.merged(block_independent)
                yield q, scales, block_error
            if record:
                self.reports.append(RebaseReport(name, rows, rebased, error, independent))

        return each()

    def summary(self) -> dict[str, Any]:
        """Rows rebased, and the largest error against independent quantization's (ratios of the per-tensor maxima)."""
        rows = sum(r.rows for r in self.reports)
        rebased = sum(r.rows_rebased for r in self.reports)

        def ratio(a: float, b: float) -> float:
            return a / b if b > 0 else 1.0

        worst = max(self.reports, key=lambda r: ratio(r.error.max_abs_error, r.independent.max_abs_error), default=None)
        return {
            "base": str(self.path),
            "base_digest": self.digest,
            "matrices": len(self.reports),
            "rows": rows,
            "rows_rebased": rebased,
            "max_abs_error_ratio": max((ratio(r.error.max_abs_error, r.independent.max_abs_error) for r in self.reports), default=1.0),
            "max_rel_error_ratio": max((ratio(r.error.max_rel_error, r.independent.max_rel_error) for r in self.reports), default=1.0),
            "max_abs_error": max((r.error.max_abs_error for r in self.reports), default=0.0),
            "independent_max_abs_error": max((r.independent.max_abs_error for r in self.reports), default=0.0),
            "worst_tensor": worst.name if worst is not None else None,
            "scale_ratio_bound": REBASE_MAX_SCALE_RATIO,
        }


# ---------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaReport:
    """What ``write_delta`` wrote."""

    path: Path | None  # None: nothing to write (every chunk is in the base) or too little saved
    base_digest: str
    target_digest: str  # the new model's digest, after its manifest lists the delta
    chunks_shared: int  # chunks the base lists by sha256: a client copies them
    chunks_whole: int
    chunks_difference: int
    size_bytes: int  # the delta file's
    file_size_bytes: int  # the new model file's
    reason: str = ""


def _layer_map(old: Manifest, new: Manifest) -> dict[int, int]:
    """New layer index -> the base's layer of the same name holding the same tensors at the same places."""
    by_name = {layer.name: layer for layer in old.layers}
    mapping = {}
    for layer in new.layers:
        base = by_name.get(layer.name)
        if base is None or base.raw_size_bytes != layer.raw_size_bytes:
            continue

        def shape(manifest: Manifest, index: int, start: int) -> list[tuple[Any, ...]]:
            return sorted((t.name, t.dtype, t.shape, t.raw_offset - start, t.coarse_shift) for t in manifest.tensors_of_layer(index))

        if shape(old, base.index, base.raw_offset) == shape(new, layer.index, layer.raw_offset):
            mapping[layer.index] = base.index
    return mapping


def _progressive_ranges(manifest: Manifest) -> list[tuple[int, int]]:
    return [(t.raw_offset, t.raw_end) for t in manifest.tensors if t.coarse_shift is not None]


def _overlaps(ranges: Sequence[tuple[int, int]], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


def write_delta(target: str | os.PathLike[str], base: str | os.PathLike[str], *, level: int = DELTA_ZSTD_LEVEL) -> DeltaReport:
    """Write the delta file of ``target`` against ``base`` beside ``target`` and list it in ``target``'s manifest.

    Every pass-0 chunk of ``target`` whose sha256 the base does not list gets an entry: a difference against the same
    place of the base's store when its layer has the same tensors there and that is smaller, else the chunk whole.
    Chunks of progressive tensors get none (a client fetches them from the model file). Nothing is written when no
    chunk needs an entry, or when the delta file would be at least MAX_DELTA_SHARE of the model file.
    """
    from .reader import ModelReader

    target, base = Path(target), Path(base)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    with ModelReader(base) as old, ModelReader(target) as new:
        old_progressive, new_progressive = _progressive_ranges(old.manifest), _progressive_ranges(new.manifest)
        shared = {c.sha256 for c in old.manifest.chunks if not _overlaps(old_progressive, c.raw_offset, c.raw_end)}
        layers = _layer_map(old.manifest, new.manifest)
        entries: list[tuple[int, int, int, bytes, bytes]] = []  # chunk index, method, base raw offset, sha256, frame
        chunks_shared = 0
        old_layer: tuple[int, bytearray] | None = None
        for chunk in new.manifest.chunks:
            if chunk.sha256 in shared:
                chunks_shared += 1
                continue
            if _overlaps(new_progressive, chunk.raw_offset, chunk.raw_end):
                continue
            frame = bytes(new.chunk_bytes(chunk))
            best = (chunk.index, int(DeltaMethod.WHOLE), 0, chunk.sha256, frame)
            base_layer = layers.get(chunk.layer_index)
            if base_layer is not None:
                layer, other = new.manifest.layers[chunk.layer_index], old.manifest.layers[base_layer]
                base_offset = other.raw_offset + chunk.raw_offset - layer.raw_offset
                if not _overlaps(old_progressive, base_offset, base_offset + chunk.raw_size_bytes):
                    if old_layer is None or old_layer[0] != base_layer:
                        old_layer = (base_layer, old.read_layer(base_layer))
                    start = base_offset - other.raw_offset
                    base_raw = np.frombuffer(old_layer[1], np.uint8, chunk.raw_size_bytes, start)
                    raw = np.frombuffer(new.read_chunk(chunk), np.uint8)
                    difference = compressor.compress((raw - base_raw).tobytes())  # uint8 arithmetic wraps mod 256
                    if len(difference) < len(frame):
                        best = (chunk.index, int(DeltaMethod.DIFFERENCE), base_offset, hashlib.sha256(raw.tobytes()).digest(), difference)
            entries.append(best)
        base_digest, file_size = old.manifest.digest, new.size_bytes
    counts = {m: sum(1 for e in entries if e[1] == m) for m in DeltaMethod}
    report = DeltaReport(None, base_digest, "", chunks_shared, counts[DeltaMethod.WHOLE], counts[DeltaMethod.DIFFERENCE], 0, file_size)
    if not entries:
        return dataclasses.replace(report, target_digest=_digest_of(target), reason="every chunk is in the base")
    data = encode_delta(base_digest, entries)
    if len(data) >= MAX_DELTA_SHARE * file_size:
        return dataclasses.replace(report, target_digest=_digest_of(target), reason="it would be nearly the whole file")
    index_sha = hashlib.sha256(data[: DELTA_PREAMBLE_SIZE_BYTES + len(entries) * DELTA_ENTRY_SIZE_BYTES]).digest()
    manifest = attach_delta_base(target, DeltaBase(base_digest, index_sha, len(data)))
    path = target.with_name(delta_file_name(target.name, base_digest, manifest.digest))
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
    return dataclasses.replace(
        report, path=path, target_digest=manifest.digest, size_bytes=len(data), file_size_bytes=target.stat().st_size
    )


def _digest_of(path: Path) -> str:
    from .reader import ModelReader

    with ModelReader(path) as reader:
        return reader.manifest.digest


def encode_delta(base_digest: str, entries: Sequence[tuple[int, int, int, bytes, bytes]]) -> bytes:
    """A whole delta file: entries (chunk index, method, base raw offset, sha256, frame), ascending chunk index."""
    head = bytearray(DELTA_PREAMBLE.pack(DELTA_MAGIC, DELTA_VERSION, 0, len(entries), bytes.fromhex(base_digest)))
    offset = 0
    for chunk_index, method, base_offset, sha, frame in entries:
        head += DELTA_ENTRY.pack(chunk_index, method, base_offset, offset, len(frame), sha)
        offset += len(frame)
    head += bytes(delta_data_offset(len(entries)) - len(head))
    return bytes(head) + b"".join(entry[4] for entry in entries)


def summarize_delta(data: bytes | memoryview, file_size_bytes: int) -> dict[str, Any]:
    """A delta file's summary for ``inspect``: its base, entries by method and their bytes."""
    index = parse_delta_index(data, file_size_bytes=file_size_bytes)
    by_method = {
        m.name.lower(): {"chunks": int((index.method == m).sum()), "bytes": int(index.size[index.method == m].sum())} for m in DeltaMethod
    }
    return {
        "kind": "delta",
        "base_digest": index.base_digest,
        "entries": len(index),
        "index_bytes": DELTA_PREAMBLE_SIZE_BYTES + len(index) * DELTA_ENTRY_SIZE_BYTES,
        "index_sha256": hashlib.sha256(bytes(data[: DELTA_PREAMBLE_SIZE_BYTES + len(index) * DELTA_ENTRY_SIZE_BYTES])).hexdigest(),
        "file_bytes": file_size_bytes,
        "by_method": by_method,
    }


__all__ = [
    "DELTA_ENTRY",
    "DELTA_MAGIC",
    "DELTA_PREAMBLE",
    "BaseScales",
    "DeltaBase",
    "DeltaIndex",
    "DeltaMethod",
    "DeltaReport",
    "attach_delta_base",
    "delta_file_name",
    "encode_delta",
    "parse_delta_index",
    "quantize_like",
    "read_delta_bases",
    "rebuild_chunk",
    "summarize_delta",
    "write_delta",
]
