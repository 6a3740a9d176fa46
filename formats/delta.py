"""Delta files: what a client holding one version of a model needs to rebuild the next (FORMAT.md, "Delta files").

A delta file (``.slmd``) is written beside a new model file by ``convert --base OLD``. Against the base (the old
version, named by its manifest digest) it holds, for every pass-0 chunk of the new model that the base does not list
by sha256 (those a client copies from its cache), either the chunk's own zstd frame (``DeltaMethod.WHOLE``) or a zstd
frame of the byte-wise difference new - base (mod 256) over the chunk's range of the base's layer store
(``DeltaMethod.DIFFERENCE``; for int8 weights that is the difference of the codes). Each entry carries the sha256 of
the chunk's raw bytes (of its frame, for a whole chunk), so that what a client rebuilds is checked before it is used;
the new model's manifest lists each base with the sha256 of the delta file's index (preamble and entries), so that
the index, and through it every rebuilt chunk, is pinned by the new model's digest.

The layout is declared in ``constants`` (``DELTA_PREAMBLE``, ``DELTA_ENTRY``) and read and encoded in ``delta_file``;
everything is little-endian. ``rebase.quantize_like`` quantizes a new matrix with the base's per-row scales so that
codes that did not move stay equal. This module builds the file: ``write_delta`` plans and writes it and lists it in
the new model's manifest (``attach_delta_base``); ``read_delta_bases`` reads that list. It is also the public face of
the delta format: its ``__all__`` names what the client and the server import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zstandard

from ..errors import FormatError, ManifestSchemaError
from .constants import (
    DATA_ALIGNMENT,
    DELTA_ENTRY,
    DELTA_MAGIC,
    DELTA_PREAMBLE,
    DELTA_PREAMBLE_SIZE_BYTES,
    PREAMBLE_SIZE_BYTES,
    SHA256_SIZE_BYTES,
    DeltaMethod,
    align_up,
    delta_index_size,
)
from .delta_file import DeltaIndex, delta_file_name, encode_delta, index_size_needed, parse_delta_index, rebuild_chunk, summarize_delta
from .manifest import Manifest, parse_manifest
from .msgpack_bounded import decode, locate_map_values

DELTA_ZSTD_LEVEL = 19
"""Difference frames, mostly zeros and small values, are worth the slowest level (written once, by the publisher): on
a fine-tune of all-MiniLM-L6-v2 its difference frames take 2.42 MB at level 19, 2.80 at 9, 3.03 at 3
(``python tools/bench_delta.py``, then the frames recompressed)."""

MAX_DELTA_SHARE = 0.9
"""A delta file at least this share of the new model's file is not written: it would save too little."""

DELTA_BASES_KEY = "deltas"
"""The manifest's root key listing the bases a delta file was written against (readers that do not know it ignore it)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeltaBase:
    """One ``deltas`` entry of a manifest: a delta file against the model with manifest digest ``digest``."""

    digest: str  # hex
    index_sha256: bytes  # of the delta file's index, bytes [0, delta_index_size(entries)): preamble and entries
    size_bytes: int  # the delta file's size


# ---------------------------------------------------------------- the manifest's list of bases


def read_delta_bases(manifest_bytes: bytes | memoryview) -> list[DeltaBase]:
    """The ``deltas`` root key of a manifest (already parsed and valid otherwise); [] when absent or malformed."""
    data = bytes(manifest_bytes)
    try:
        root = locate_map_values(data, (0, len(data)), "root")
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
    index_sha = hashlib.sha256(data[: delta_index_size(len(entries))]).digest()
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


__all__ = [
    "DELTA_ENTRY",
    "DELTA_MAGIC",
    "DELTA_PREAMBLE",
    "DELTA_PREAMBLE_SIZE_BYTES",
    "DeltaBase",
    "DeltaIndex",
    "DeltaMethod",
    "DeltaReport",
    "attach_delta_base",
    "delta_file_name",
    "encode_delta",
    "index_size_needed",
    "parse_delta_index",
    "read_delta_bases",
    "rebuild_chunk",
    "summarize_delta",
    "write_delta",
]
