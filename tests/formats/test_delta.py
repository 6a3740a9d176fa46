"""Delta files (FORMAT.md, "Delta files"): golden bytes of a tiny pair, the index's checks, quantizing with a base's
scales within the stated bound, and rebuilding a chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamload.errors import ChunkDecodeError, ChunkIntegrityError, FormatError
from streamload.formats import ModelReader, ModelWriter, QuantScheme
from streamload.formats.delta import (
    DELTA_ENTRY,
    DELTA_MAGIC,
    DELTA_PREAMBLE,
    DeltaMethod,
    delta_file_name,
    parse_delta_index,
    read_delta_bases,
    rebuild_chunk,
    write_delta,
)
from streamload.formats.quantize import quantize_int8_rows
from streamload.formats.rebase import REBASE_MAX_SCALE_RATIO, quantize_like

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_BASE = GOLDEN / "tiny-base.slm"
GOLDEN_TARGET = GOLDEN / "tiny-updated.slm"
GOLDEN_DELTA = GOLDEN / "tiny-updated.slmd"


def write_tiny_version(path: Path, *, updated: bool) -> None:
    """Two layers in 64-byte chunks: an int8 matrix (12 x 8) with its scales, and a float vector. The update moves a
    few weights (quantized with the base's scales) and changes the vector; the first chunk stays the same."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((12, 8)).astype(np.float32)
    q, scales, error = quantize_int8_rows(weight)
    norm = np.array([1.0, -2.0, 0.5, 0.25], np.float32)
    if updated:
        weight[9:, :3] += 0.01  # rows 9-11: the second 64-byte chunk of the matrix holds them
        q, scales, error, _, _ = quantize_like(weight, scales)
        norm = norm * 1.5
    with ModelWriter(path, config={"architecture": "tiny"}, chunk_size_bytes=64, zstd_level=3, threads=1) as w:
        w.begin_layer("embeddings")
        w.add_tensor("w", q, quant=QuantScheme.INT8_ROW, scales="w.scales", error=error)
        w.add_tensor("w.scales", scales)
        w.end_layer()
        w.begin_layer("head")
        w.add_tensor("norm", norm)
        w.end_layer()
        w.finish()


@pytest.fixture
def tiny_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    base, target = tmp_path / "tiny.slm", tmp_path / "tiny-updated.slm"
    write_tiny_version(base, updated=False)
    write_tiny_version(target, updated=True)
    report = write_delta(target, base)
    assert report.path is not None
    return base, target, report.path


def test_delta_reproduces_golden_bytes(tiny_pair: tuple[Path, Path, Path]) -> None:
    base, target, delta = tiny_pair
    assert base.read_bytes() == GOLDEN_BASE.read_bytes()
    assert target.read_bytes() == GOLDEN_TARGET.read_bytes(), "the model file's bytes changed: a format change needs new golden bytes"
    assert delta.read_bytes() == GOLDEN_DELTA.read_bytes(), "the delta file's bytes changed: a format change needs a version bump"


def test_golden_delta_is_spelled_out() -> None:
    data = GOLDEN_DELTA.read_bytes()
    assert data[:8] == bytes.fromhex("89534c440d0a1a0a") == DELTA_MAGIC
    magic, version, flags, count, base = DELTA_PREAMBLE.unpack_from(data)
    assert (version, flags, count) == (1, 0, 3) and DELTA_PREAMBLE.size == 56 and DELTA_ENTRY.size == 64
    entries = [DELTA_ENTRY.unpack_from(data, 56 + 64 * i) for i in range(count)]
    # chunk 0 (rows 0-7 of w) and chunk 2 (padding, the scales of rows 0-7) are shared: a client copies them
    assert [e[:3] for e in entries] == [
        (1, DeltaMethod.DIFFERENCE, 64),
        (3, DeltaMethod.DIFFERENCE, 160),
        (4, DeltaMethod.DIFFERENCE, 4096),
    ]
    assert [e[3] for e in entries] == [0, entries[0][4], entries[0][4] + entries[1][4]]  # frames back to back from data_offset
    data_offset = (56 + 64 * count + 63) // 64 * 64
    assert len(data) == data_offset + sum(e[4] for e in entries)
    with ModelReader(GOLDEN_TARGET) as new, ModelReader(GOLDEN_BASE) as old:
        assert base.hex() == old.manifest.digest != new.manifest.digest
        chunks = new.manifest.chunks
        assert [(c.index, c.raw_offset, c.raw_size_bytes) for c in chunks] == [
            (0, 0, 64),
            (1, 64, 32),
            (2, 96, 64),
            (3, 160, 16),
            (4, 4096, 16),
        ]
        store = bytes(old.read_layer(0)) + bytes(4096 - old.manifest.layers[0].raw_size_bytes) + bytes(old.read_layer(1))
        for index, method, base_offset, offset, size, sha in entries:
            frame = data[data_offset + offset : data_offset + offset + size]
            rebuilt = rebuild_chunk(chunks[index], method, frame, sha, store[base_offset : base_offset + chunks[index].raw_size_bytes])
            assert bytes(rebuilt) == bytes(new.read_chunk(chunks[index])) and hashlib.sha256(rebuilt).digest() == sha
        listed = read_delta_bases(GOLDEN_TARGET.read_bytes()[32 : 32 + new.manifest.size_bytes])
        assert [(b.digest, b.size_bytes) for b in listed] == [(base.hex(), len(data))]
        assert listed[0].index_sha256 == hashlib.sha256(data[: 56 + 64 * count]).digest()
        assert (
            delta_file_name("tiny-updated.slm", base.hex(), new.manifest.digest)
            == f"tiny-updated.{base.hex()[:12]}-{new.manifest.digest[:12]}.slmd"
        )


def test_the_rewritten_header_reads_as_any_model(tiny_pair: tuple[Path, Path, Path]) -> None:
    _, target, _ = tiny_pair
    with ModelReader(target) as reader:
        assert reader.verify() == []


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        (0, b"\x00", "bad magic"),
        (8, b"\x02", "version"),
        (56, (9).to_bytes(4, "little"), "ascending"),  # the first entry's chunk index after the second's
        (60, (7).to_bytes(4, "little"), "unknown method"),
        (56 + 24, (0).to_bytes(8, "little"), "empty"),
    ],
)
def test_a_malformed_index_is_refused(where: int, value: bytes, message: str) -> None:
    data = bytearray(GOLDEN_DELTA.read_bytes())
    data[where : where + len(value)] = value
    with pytest.raises(FormatError, match=message):
        parse_delta_index(bytes(data), file_size_bytes=len(data))


def test_a_truncated_delta_is_refused() -> None:
    data = GOLDEN_DELTA.read_bytes()
    with pytest.raises(FormatError, match="truncated"):
        parse_delta_index(data, file_size_bytes=len(data) - 1)


def test_a_damaged_frame_or_wrong_base_is_refused(tiny_pair: tuple[Path, Path, Path]) -> None:
    base, target, delta = tiny_pair
    index = parse_delta_index(delta.read_bytes(), file_size_bytes=delta.stat().st_size)
    data = delta.read_bytes()
    with ModelReader(target) as new, ModelReader(base) as old:
        chunk = new.manifest.chunks[int(index.chunk_index[0])]
        frame = data[index.data_offset + int(index.offset[0]) : index.data_offset + int(index.offset[0] + index.size[0])]
        right = bytes(old.read_layer(0)[int(index.base_raw_offset[0]) : int(index.base_raw_offset[0]) + chunk.raw_size_bytes])
        sha = index.sha256[0].tobytes()
        assert bytes(rebuild_chunk(chunk, DeltaMethod.DIFFERENCE, frame, sha, right)) == bytes(new.read_chunk(chunk))
        wrong = bytes([right[0] ^ 1]) + right[1:]
        with pytest.raises(ChunkIntegrityError):
            rebuild_chunk(chunk, DeltaMethod.DIFFERENCE, frame, sha, wrong)
        with pytest.raises((ChunkIntegrityError, ChunkDecodeError)):
            rebuild_chunk(chunk, DeltaMethod.DIFFERENCE, frame[:-1] + bytes([frame[-1] ^ 0xFF]), sha, right)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, st.tuples(st.integers(1, 12), st.integers(1, 24)), elements=st.floats(-10, 10, width=32)),
    st.floats(0.5, 1.6),
)
def test_base_scales_keep_the_error_within_the_stated_bound(weight: np.ndarray, stretch: float) -> None:
    """Whatever the base's scales, every row's error is at most REBASE_MAX_SCALE_RATIO x half its own step."""
    _, own, _ = quantize_int8_rows(weight)
    q, scales, error, independent, rebased = quantize_like(weight, own * np.float32(stretch))
    restored = q.astype(np.float32) * scales[:, None]
    assert np.abs(q.astype(np.int16)).max() <= 127
    bound = REBASE_MAX_SCALE_RATIO * own[:, None] / 2 + 1e-6 * max(1.0, float(np.abs(weight).max()))
    assert np.all(np.abs(weight - restored) <= bound)
    assert error.max_abs_error <= REBASE_MAX_SCALE_RATIO * max(independent.max_abs_error, float(own.max()) / 2) + 1e-6
    if stretch <= 1.0:  # the base's scale is at most the row's own: kept only where the row fits
        assert rebased <= len(weight)


def test_unchanged_rows_keep_their_codes() -> None:
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    q, scales, _ = quantize_int8_rows(weight)
    moved = weight.copy()
    moved[0, 0] += 1e-4
    q2, scales2, _, _, rebased = quantize_like(moved, scales)
    assert rebased == 64 and np.array_equal(scales2, scales) and (q2 != q).sum() <= 1
