"""Hostile files whose every sha256 is right: what they claim is bounded by what they are, and a client's memory and disk
follow what it verified, never what a file declares."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import msgpack
import pytest
import zstandard

import streamload
from streamload.download.pipeline import BATCH_RAW_BYTES
from streamload.errors import OutOfBoundsError
from streamload.formats import ModelReader
from streamload.formats.constants import MAX_STORE_PER_COMPRESSED_BYTE, STORE_ALLOWANCE_BYTES, DType, QuantScheme
from streamload.formats.manifest import ChunkEntry, LayerEntry, TensorEntry, encode_manifest
from tests.support.mutate import join_file, split_file
from tests.support.serving import serve_directory, serve_files


def write_zeros_model(path: Path, layers: int, layer_bytes: int, chunk_bytes: int) -> None:
    """Layers of zeros, each in chunks of ``chunk_bytes``: one zstd frame of zeros (a few bytes) repeated. The writer
    would refuse such a file once it is over the bounds: it is written here byte by byte."""
    frame = zstandard.ZstdCompressor(level=3).compress(bytes(chunk_bytes))
    sha = hashlib.sha256(frame).digest()
    chunks, tensors, entries = [], [], []
    for layer in range(layers):
        entries.append(LayerEntry(layer, f"layer{layer}", layer * layer_bytes, layer_bytes))
        tensors.append(
            TensorEntry(f"zeros{layer}", layer, DType.F32, (layer_bytes // 4,), layer * layer_bytes, QuantScheme.NONE, None, None, None)
        )
        for at in range(0, layer_bytes, chunk_bytes):
            chunks.append(ChunkEntry(len(chunks), layer, len(chunks) * len(frame), len(frame), layer * layer_bytes + at, chunk_bytes, sha))
    manifest = encode_manifest(
        config={"architecture": "zeros"},
        layers=entries,
        tensors=tensors,
        chunks=chunks,
        tokenizer=None,
        chunk_size_bytes=chunk_bytes,
        int8_histogram=None,
    )
    path.write_bytes(join_file(msgpack.unpackb(manifest), frame * len(chunks)))


def test_a_store_over_the_bound_is_refused_at_parse_time(tmp_path: Path) -> None:
    path = tmp_path / "bomb.slm"
    write_zeros_model(path, layers=4, layer_bytes=64 << 20, chunk_bytes=1 << 20)  # 256 MiB of store from ~10 KB
    assert path.stat().st_size * MAX_STORE_PER_COMPRESSED_BYTE + STORE_ALLOWANCE_BYTES < 256 << 20
    with pytest.raises(OutOfBoundsError, match="layer store from .* bytes of chunks, over the bound"):
        ModelReader(path).close()


async def test_a_bomb_over_the_bound_allocates_nothing(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    write_zeros_model(www / "bomb.slm", layers=4, layer_bytes=64 << 20, chunk_bytes=1 << 20)
    with serve_files(www) as server:  # a static host serves it (the bundled server would refuse it)
        with pytest.raises(OutOfBoundsError):
            async with streamload.open(server.url("bomb.slm"), cache_dir=tmp_path / "cache"):
                pass
    assert not list((tmp_path / "cache").glob("models/*/store.bin"))


async def test_batches_of_highly_compressed_chunks_are_bounded_in_raw_bytes(tmp_path: Path) -> None:
    """48 MiB of zeros in 768 chunks of ~20 bytes, within the store bound: they fit one batch of compressed bytes many
    times over, yet no batch decompresses more than BATCH_RAW_BYTES at once."""
    www = tmp_path / "www"
    www.mkdir()
    chunk_bytes = 64 << 10
    write_zeros_model(www / "zeros.slm", layers=3, layer_bytes=16 << 20, chunk_bytes=chunk_bytes)
    with serve_directory(www) as server:
        async with streamload.open(server.url("zeros.slm"), cache_dir=tmp_path / "cache") as model:
            await asyncio.wait_for(model.wait_complete(), 60)
            batches = model._session.download.pipeline._batch_times  # type: ignore[union-attr]
    assert sum(len(indices) for indices, _ in batches) == 768
    assert max(len(indices) for indices, _ in batches) * chunk_bytes <= BATCH_RAW_BYTES


def test_chunks_of_a_reserved_pass_do_not_raise_the_store_bound(tmp_path: Path) -> None:
    """A reader skips a reserved pass's chunks: they cannot pay for a store. 16 MiB of them (real bytes in the file)
    would otherwise let ~10 KB of zero frames declare 256 MiB."""
    path = tmp_path / "padded.slm"
    write_zeros_model(path, layers=4, layer_bytes=64 << 20, chunk_bytes=1 << 20)
    manifest, region = split_file(path.read_bytes())
    padding = bytes(16 << 20)
    manifest["chunks"].append(
        {
            "layer": 0,
            "offset": len(region),
            "size": len(padding),
            "raw_offset": 0,
            "raw_size": 1,
            "sha256": hashlib.sha256(padding).digest(),
            "pass": 2,
        }
    )
    path.write_bytes(join_file(manifest, region + padding))
    with pytest.raises(OutOfBoundsError, match="over the bound"):
        ModelReader(path).close()
