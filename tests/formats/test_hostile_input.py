"""Malformed and hostile files: the reader raises a specific FormatError, never anything else."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamload import errors
from streamload.formats import ModelReader
from streamload.formats.constants import MAX_MANIFEST_SIZE_BYTES
from streamload.formats.manifest import ChunkEntry
from streamload.formats.reader import check_frame, check_frames, decompress_batch, decompress_chunk, encode_preamble, frame_size_bytes
from tests.support.mutate import join_file, mutate_bytes, mutate_structure, read_everything, split_file

GOLDEN = (Path(__file__).parent / "golden" / "tiny-v1.slm").read_bytes()  # the byte-level cases below use its layout
GOLDEN_V2 = (Path(__file__).parent / "golden" / "tiny.slm").read_bytes()
GOLDEN_V3 = (Path(__file__).parent / "golden" / "tiny-progressive.slm").read_bytes()


def test_golden_file_reads() -> None:
    assert read_everything(GOLDEN) == 24 + 56 + 12
    assert read_everything(GOLDEN_V2) == 24 + 64 + 60 + 12 + 8 + 8 + 4


def test_row_table_rules() -> None:
    """Version 2's row tables: after every step, one 2-D tensor each, their scales in a step; a known kind."""
    _, region = split_file(GOLDEN_V2)

    def altered(change) -> bytes:  # noqa: ANN001
        m, _ = split_file(GOLDEN_V2)
        change(m)
        return join_file(m, region)

    def table_first(m: dict) -> None:
        m["layers"][0]["kind"] = "rows"

    def second_tensor(m: dict) -> None:
        m["tensors"][3]["layer"] = 2
        m["tensors"][3]["raw_offset"] = 8256
        m["layers"][2]["raw_size"] = 128  # room for it (tensors are checked before the chunks' tiling)

    def scales_in_table(m: dict) -> None:
        m["tensors"][2]["layer"] = 2
        m["tensors"][2]["raw_offset"] = 8256
        m["layers"][2]["raw_size"] = 128

    def unknown_kind(m: dict) -> None:
        m["layers"][2]["kind"] = "sparse"

    expect(errors.ManifestSchemaError, altered(table_first), "row tables come last")
    expect(errors.ManifestSchemaError, altered(second_tensor), "exactly one 2-D tensor")
    expect(errors.ManifestSchemaError, altered(scales_in_table), "in an execution step")
    expect(errors.ManifestSchemaError, altered(unknown_kind), "unknown layer kind 'sparse'")


def expect(error: type[errors.FormatError], data: bytes, match: str) -> None:
    with pytest.raises(error, match=match):
        read_everything(data)


def test_specific_errors() -> None:
    manifest, region = split_file(GOLDEN)
    expect(errors.BadMagicError, b"PK\x03\x04" + GOLDEN[4:], "not a streamload .slm file")
    expect(errors.BadMagicError, GOLDEN[:10], "shorter than")
    expect(errors.UnsupportedVersionError, GOLDEN[:8] + (4).to_bytes(4, "little") + GOLDEN[12:], "upgrade streamload")
    huge = GOLDEN[:16] + (MAX_MANIFEST_SIZE_BYTES + 1).to_bytes(8, "little") + GOLDEN[24:]
    expect(errors.ManifestTooLargeError, huge, "over the")
    expect(errors.OutOfBoundsError, GOLDEN[:200], "truncated")
    expect(errors.ManifestDecodeError, encode_preamble(3) + b"\xc1\xc1\xc1" + bytes(29), "not valid msgpack")

    def altered(path: list, value: object, *more: tuple[list, object]) -> bytes:
        m, _ = split_file(GOLDEN)
        for where, new in ((path, value), *more):
            node = m
            for key in where[:-1]:
                node = node[key]
            node[where[-1]] = new
        return join_file(m, region)

    expect(errors.UnknownDTypeError, altered(["tensors", 2, "dtype"], "f64"), "unknown dtype 'f64'")
    expect(errors.OutOfBoundsError, altered(["chunks", 2, "size"], 10**6), "past the")
    expect(errors.OverlapError, altered(["chunks", 1, "offset"], 0), "overlaps")
    expect(errors.OverlapError, altered(["tensors", 1, "raw_offset"], 0), "overlap")
    expect(errors.ManifestSchemaError, altered(["chunks", 1, "raw_offset"], 30), "tile")
    expect(errors.ManifestSchemaError, altered(["layers", 1, "raw_offset"], 100), "multiple of 4096")
    expect(errors.ManifestSchemaError, altered(["tensors", 0, "shape"], "big"), "type str")
    expect(
        errors.ChunkSizeError,
        altered(["chunks", 0, "raw_size"], 25, (["chunks", 1, "raw_offset"], 25), (["chunks", 1, "raw_size"], 55)),
        "declares 24 raw bytes",
    )
    corrupted = bytearray(GOLDEN)
    corrupted[-1] ^= 0xFF
    with pytest.raises(errors.ChunkIntegrityError, match="chunk 2 of layer 1: sha256 mismatch") as info:
        read_everything(bytes(corrupted))
    assert (info.value.layer_index, info.value.chunk_index) == (1, 2)


def test_unknown_manifest_keys_are_ignored() -> None:
    manifest, region = split_file(GOLDEN)
    manifest["future_feature"] = {"anything": [1, 2, 3]}
    manifest["tensors"][0]["future_field"] = "x"
    assert read_everything(join_file(manifest, region)) == 92


def test_chunks_of_reserved_passes_are_bounds_checked_and_skipped() -> None:
    manifest, region = split_file(GOLDEN)
    extra = dict(manifest["chunks"][2], offset=len(region), raw_size=12, pass_=None)
    extra.pop("pass_")
    extra["pass"] = 2  # pass 1 refines progressive tensors (tests/formats/test_progressive.py); higher ones are reserved
    manifest["chunks"].append(extra)
    data = join_file(manifest, region + region[manifest["chunks"][2]["offset"] :])
    assert read_everything(data) == 92 + 12


def assert_only_format_errors(data: bytes) -> None:
    try:
        read_everything(data)
    except errors.FormatError:
        pass


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_mutated_bytes_raise_only_format_errors(seed: int) -> None:
    assert_only_format_errors(mutate_bytes(GOLDEN, random.Random(seed)))
    assert_only_format_errors(mutate_bytes(GOLDEN_V2, random.Random(seed)))
    assert_only_format_errors(mutate_bytes(GOLDEN_V3, random.Random(seed)))


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32))
def test_mutated_manifests_raise_only_format_errors(seed: int) -> None:
    rng = random.Random(seed)
    for golden in (GOLDEN, GOLDEN_V2, GOLDEN_V3):
        manifest, region = split_file(golden)
        for _ in range(rng.randint(1, 3)):
            manifest = mutate_structure(manifest, rng)
        assert_only_format_errors(join_file(manifest, region))


@pytest.mark.parametrize(
    "tail",
    [b"garbage!", bytes(8), (0x184D2A50).to_bytes(4, "little") + (4).to_bytes(4, "little") + b"skip"],
    ids=["garbage", "zeros", "skippable-frame"],
)
def test_bytes_after_a_chunks_frame_are_refused(tmp_path: Path, tail: bytes) -> None:
    """The manifest's sha256 covers frame + tail, so only the one-frame rule can catch it (FORMAT.md, "Chunks")."""
    manifest, region = split_file(GOLDEN)
    last = manifest["chunks"][-1]
    assert last["offset"] + last["size"] == len(region)
    frame_and_tail = region[last["offset"] :] + tail
    last["size"] = len(frame_and_tail)
    last["sha256"] = hashlib.sha256(frame_and_tail).digest()
    path = tmp_path / "tail.slm"
    path.write_bytes(join_file(manifest, region + tail))
    expect(errors.ChunkDecodeError, path.read_bytes(), rf"chunk 2 of layer 1 has {len(tail)} bytes after its zstd frame")
    with ModelReader(path) as reader:
        problems = reader.verify()
    assert [type(p) for p in problems] == [errors.ChunkDecodeError]


def test_frame_size_walk_matches_the_compressor() -> None:
    rng = np.random.default_rng(0)
    for raw in (bytes(1 << 20), b"a", rng.integers(-127, 128, 1 << 20, dtype=np.int8).tobytes()):
        for checksum in (False, True):
            frame = zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(raw)
            assert frame_size_bytes(frame) == len(frame)
            assert frame_size_bytes(memoryview(frame + b"tail")) == len(frame)
            with pytest.raises(errors.ChunkDecodeError, match="truncated"):
                frame_size_bytes(frame[:-1])
    with pytest.raises(errors.ChunkDecodeError):  # the magic alone: the frame header is cut short
        frame_size_bytes(b"\x28\xb5\x2f\xfd")


def test_a_wrong_buffer_is_the_callers_usage_error() -> None:
    frame = zstandard.ZstdCompressor().compress(bytes(100))
    chunk = ChunkEntry(0, 0, 0, len(frame), 0, 100, hashlib.sha256(frame).digest())
    with pytest.raises(errors.UsageError, match="output buffer is 99 bytes"):
        decompress_chunk(chunk, frame, bytearray(99))
    with pytest.raises(errors.UsageError, match="do not hold exactly these 1 chunks"):
        check_frames([chunk], frame + b"\x00")


def test_batch_frame_check_agrees_with_check_frame() -> None:
    """check_frames (numpy, for a batch of small chunks) accepts and refuses exactly what check_frame does, frame by frame."""
    rng = np.random.default_rng(1)
    raws = [b"a", bytes(256), rng.bytes(200), rng.bytes(300), bytes(70_000), rng.bytes(1 << 18)]
    cases: list[tuple[bytes, int]] = []  # (chunk bytes, manifest raw size)
    for raw in raws:
        for checksum, content_size in ((False, True), (True, True), (False, False)):
            frame = zstandard.ZstdCompressor(level=3, write_checksum=checksum, write_content_size=content_size).compress(raw)
            cases += [(frame, len(raw)), (frame, len(raw) + 1), (frame + b"\x00", len(raw)), (frame[:-1], len(raw))]
    cases.append((b"\x00" * 12, 1))  # no magic
    for first in range(0, len(cases), 5):  # batches with bad frames in varying places
        batch = cases[first : first + 5]
        chunks = [ChunkEntry(i, 0, 0, len(data), 0, raw_size, bytes(32)) for i, (data, raw_size) in enumerate(batch)]
        expected: type[Exception] | None = None
        for chunk, (data, _) in zip(chunks, batch, strict=True):
            try:
                check_frame(chunk, data)
            except errors.FormatError as exc:
                expected = type(exc)
                break
        if expected is None:
            check_frames(chunks, b"".join(data for data, _ in batch))
        else:
            with pytest.raises(expected):
                check_frames(chunks, b"".join(data for data, _ in batch))


def test_decompress_batch_matches_one_by_one() -> None:
    rng = np.random.default_rng(2)
    raws = [rng.integers(0, 4, 256, dtype=np.uint8).tobytes() for _ in range(40)] + [bytes(256), rng.bytes(256)]
    frames = [zstandard.ZstdCompressor(level=3).compress(raw) for raw in raws]
    chunks = [ChunkEntry(i, 0, 0, len(frame), 0, len(raw), bytes(32)) for i, (frame, raw) in enumerate(zip(frames, raws, strict=True))]
    assert [bytes(raw) for raw in decompress_batch(chunks, memoryview(b"".join(frames)))] == raws
