"""A progressive model against hostile files, damaged caches and servers that ignore Range: never a wrong exact result,
never a hang. Every file here keeps every sha256 right (``verify`` calls it intact); the bytes are real, served on a
real socket, into a real cache."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path

import numpy as np
import pytest
import zstandard

import streamload
from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD
from streamload.calibrate import CalibratedShifts
from streamload.errors import FormatError, ManifestSchemaError
from streamload.formats import ModelReader, convert
from streamload.formats.constants import REFINEMENT_PASS
from tests.support.checks import assert_cache_exact
from tests.support.faulty import Faults, faulty_app
from tests.support.mutate import join_file, split_file
from tests.support.paths import FIXTURES
from tests.support.serving import ServerThread, serve_directory, serve_files


@pytest.mark.parametrize("chunk_size_bytes", [1 << 20, 16 << 10])
async def test_a_small_progressive_file_without_range_completes(tiny_progressive_slm: Path, tmp_path: Path, chunk_size_bytes: int) -> None:
    """The whole file is one span, small enough that a refinement shares a batch with the coarse chunk under it: the
    batch's coarse chunks are stored before its refinements are folded, not waited for by the thread holding them."""
    path = tiny_progressive_slm  # in 16 KiB chunks
    if chunk_size_bytes != 16 << 10:  # one chunk a layer: converted for this case alone
        path = tmp_path / "www" / "tiny-p.slm"
        path.parent.mkdir()
        convert(FIXTURES / "llama-tiny", path, chunk_size_bytes=chunk_size_bytes, progressive=True, calibrator=CalibratedShifts)
    with serve_directory(path.parent, ranges_enabled=False) as server:
        async with streamload.open(server.url(path.name), cache_dir=tmp_path / "cache") as model:
            await asyncio.wait_for(model.wait_complete(), 60)
    assert_cache_exact(tmp_path / "cache", path)


def move_chunk_before(data: bytes, moved: int, before: int) -> bytes:
    """The same file with chunk ``moved``'s bytes (and its entry) placed just before chunk ``before``'s, every offset
    made consistent again: every sha256 still right, only the order in the file changed."""
    manifest, region = split_file(data)
    entries = manifest["chunks"]
    order = [i for i in range(len(entries)) if i != moved]
    order.insert(order.index(before), moved)
    pieces, offset = [], 0
    for i in order:
        entry = dict(entries[i])
        pieces.append(region[entry["offset"] : entry["offset"] + entry["size"]])
        entry["offset"], offset = offset, offset + entry["size"]
        entries[i] = entry
    manifest["chunks"] = [entries[i] for i in order]
    return join_file(manifest, b"".join(pieces))


@pytest.fixture(scope="module")
def refinement_first(tmp_path_factory: pytest.TempPathFactory, minilm_progressive_slm: Path) -> Path:
    """minilm-p.slm with a refinement of layer 2 moved before the coarse chunk it refines."""
    with ModelReader(minilm_progressive_slm) as reader:
        refinement = next(c for c in reader.manifest.refinement_chunks if c.layer_index == 2)
        base = next(c for c in reader.manifest.chunks if c.raw_offset <= refinement.raw_offset < c.raw_end)
        position = {c.index: i for i, c in enumerate(reader.manifest.file_order_chunks())}
    path = tmp_path_factory.mktemp("www-order") / "minilm-p.slm"
    path.write_bytes(move_chunk_before(minilm_progressive_slm.read_bytes(), position[refinement.index], position[base.index]))
    return path


def test_a_refinement_before_its_coarse_chunk_is_refused_by_the_reader(refinement_first: Path) -> None:
    with pytest.raises(ManifestSchemaError, match="before chunk .* which it refines"):
        ModelReader(refinement_first).close()


async def test_a_refinement_before_its_coarse_chunk_is_refused_without_range(refinement_first: Path, tmp_path: Path) -> None:
    """Served whole (no Range), the file would be read front to back: the refinement first, onto nothing."""
    with serve_files(refinement_first.parent, ranges=False) as server:  # a static host (the bundled server refuses it)
        with pytest.raises(FormatError, match="which it refines"):
            async with streamload.open(server.url("minilm-p.slm"), cache_dir=tmp_path) as model:
                await asyncio.wait_for(model.wait_complete(), 60)


def test_the_converter_writes_every_refinement_after_its_coarse_chunks(tiny_progressive_slm: Path) -> None:
    with ModelReader(tiny_progressive_slm) as reader:  # the reader's check passes on the converter's own file
        assert reader.manifest.refinement_chunks and not reader.verify()


def forget_refinements(cache: Path, path: Path) -> int:
    """Rewrite the journal without the refinements' records and mark the copy incomplete: a download interrupted
    after every coarse chunk was stored and before any refinement was."""
    with ModelReader(path) as reader:
        refinements = {c.index for c in reader.manifest.refinement_chunks if c.pass_index == REFINEMENT_PASS}
    journal = next(cache.glob(f"models/*/{JOURNAL_NAME}"))
    records = list(JOURNAL_RECORD.iter_unpack(journal.read_bytes()))
    journal.write_bytes(b"".join(JOURNAL_RECORD.pack(*r) for r in records if r[0] not in refinements))
    (journal.parent / "complete").unlink(missing_ok=True)
    return len(refinements)


@pytest.mark.parametrize("served", ["file", "without range"])
async def test_a_damaged_coarse_chunk_under_a_pending_refinement_never_gives_a_wrong_exact_layer(
    minilm_progressive_slm: Path, tmp_path: Path, served: str
) -> None:
    """The refinement still to fetch is folded only onto coarse levels checked in this process: the zeroed coarse chunk
    under it is fetched again first, and the layer handed out is the file's, exactly (from the file, or from a server
    that sends the whole file in file order)."""
    path = minilm_progressive_slm
    async with streamload.open(path, cache_dir=tmp_path) as model:
        await model.wait_complete()
    assert forget_refinements(tmp_path, path) > 20
    with ModelReader(path) as reader:
        refinement = next(c for c in reader.manifest.refinement_chunks if c.layer_index == 3)
        base = next(c for c in reader.manifest.chunks if c.raw_offset <= refinement.raw_offset < c.raw_end)
        expected = reader.read_tensors(3)
    store = next(tmp_path.glob("models/*/store.bin"))
    with store.open("r+b") as file:
        file.seek(base.raw_offset)
        file.write(bytes(base.raw_size_bytes))
    with contextlib.ExitStack() as stack:
        source = str(path)
        if served != "file":
            source = stack.enter_context(serve_directory(path.parent, ranges_enabled=False)).url(path.name)
        async with streamload.open(source, cache_dir=tmp_path) as model:
            layer = await model.layer(3)
            for name, values in expected.items():
                np.testing.assert_array_equal(layer[name], values)
            await asyncio.wait_for(model.wait_complete(), 60)
    assert_cache_exact(tmp_path, path)


def replace_chunk(data: bytes, moved: int, raw: bytes) -> bytes:
    """The same file with chunk ``moved`` (in file order) holding ``raw`` instead, its sha256 and every offset right."""
    manifest, region = split_file(data)
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    pieces, offset = [], 0
    for i, entry in enumerate(manifest["chunks"]):
        piece = frame if i == moved else region[entry["offset"] : entry["offset"] + entry["size"]]
        if i == moved:
            entry["size"], entry["sha256"] = len(frame), hashlib.sha256(frame).digest()
        pieces.append(piece)
        entry["offset"], offset = offset, offset + len(piece)
    return join_file(manifest, b"".join(pieces))


async def test_a_refinement_folded_before_a_kill_is_never_folded_twice(tiny_progressive_slm: Path, tmp_path: Path) -> None:
    """A hostile file (every sha256 right) whose refinement is no refinement of its coarse levels: folding it twice
    gives other bytes than folding it once. After a kill between the fold and its journal record, the next run finds
    the coarse chunk under it changed, fetches it again and folds once: the exact layer is the reader's."""
    plain = tiny_progressive_slm
    with ModelReader(plain) as reader:
        refinement = reader.manifest.refinement_chunks[0]
        position = [c.index for c in reader.manifest.file_order_chunks()].index(refinement.index)
    path = tmp_path / "hostile.slm"
    path.write_bytes(replace_chunk(plain.read_bytes(), position, bytes([100]) * refinement.raw_size_bytes))
    with ModelReader(path) as reader:
        assert not reader.verify()
        expected = reader.read_tensors(refinement.layer_index)
    async with streamload.open(path, cache_dir=tmp_path / "cache") as model:
        await model.wait_complete()
    forget_refinements(tmp_path / "cache", path)  # folded, never journaled: a kill
    async with streamload.open(path, cache_dir=tmp_path / "cache") as model:
        layer = await model.layer(refinement.layer_index)
        for name, values in expected.items():
            np.testing.assert_array_equal(layer[name], values)


async def test_a_coarse_chunk_failing_its_hash_in_its_refinements_batch_sends_both_back(tiny_progressive_slm: Path, tmp_path: Path) -> None:
    """Without Range, a small file's refinement shares a batch with the coarse chunk under it; when that one fails its
    sha256 the refinement is refused with it (not folded onto the bytes that are not there) and both come again."""
    path = tiny_progressive_slm
    with ModelReader(path) as reader:
        refinement = reader.manifest.refinement_chunks[0]
        base = next(c for c in reader.manifest.chunks if c.raw_offset <= refinement.raw_offset < c.raw_end)
        start = reader.preamble.data_offset + base.offset
    faults = Faults(script=["full"] * 10, corrupt_range=(start, start + base.size_bytes), corrupt_times=1)
    with ServerThread(faulty_app(path, faults)) as server:
        async with streamload.open(server.url("tiny-p.slm"), cache_dir=tmp_path / "cache") as model:
            stats = await asyncio.wait_for(model.wait_complete(), 60)
    assert stats.integrity_failures >= 2  # the coarse chunk, and the refinement that would have been folded into it
    assert_cache_exact(tmp_path / "cache", path)
