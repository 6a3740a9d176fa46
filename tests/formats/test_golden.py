"""Golden bytes: tiny models whose every byte is pinned (version 2 as written now, version 1 as still read)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from streamload.formats import ModelReader, ModelWriter, QuantScheme
from streamload.formats.constants import MAGIC, PREAMBLE, LayerKind
from streamload.formats.quantize import quantize_int8_rows
from tests.support.tensors import read_dequantized

GOLDEN = Path(__file__).parent / "golden" / "tiny.slm"
GOLDEN_V1 = Path(__file__).parent / "golden" / "tiny-v1.slm"


def write_tiny(path: Path) -> None:
    """Three layers: an int8 matrix with its scales and a row table's scales, a float vector, then the row table
    (5 rows of 4, two rows per chunk); 64-byte chunks."""
    weight = (np.arange(24, dtype=np.float32).reshape(4, 6) - 11.5) / 8
    q, scales, error = quantize_int8_rows(weight)
    table = (np.arange(20, dtype=np.float32).reshape(5, 4) - 9.5) / 4
    table_q, table_scales, table_error = quantize_int8_rows(table)
    with ModelWriter(
        path,
        config={"architecture": "tiny", "hidden_size": 6},
        tokenizer_json=b'{"tiny": true}',
        chunk_size_bytes=64,
        zstd_level=3,
        threads=1,
    ) as w:
        w.begin_layer("embeddings")
        w.add_tensor("w", q, quant=QuantScheme.INT8_ROW, scales="w.scales", error=error)
        w.add_tensor("w.scales", scales)
        w.add_tensor("table.scales", table_scales)
        w.end_layer()
        w.begin_layer("head")
        w.add_tensor("norm", np.array([1.0, -2.0, 0.5], dtype=np.float32))
        w.end_layer()
        w.begin_layer("table", kind=LayerKind.ROWS, chunk_size_bytes=8)
        w.add_tensor("table", table_q, quant=QuantScheme.INT8_ROW, scales="table.scales", error=table_error)
        w.end_layer()
        w.finish()


def test_writer_reproduces_golden_bytes(tmp_path: Path) -> None:
    out = tmp_path / "tiny.slm"
    write_tiny(out)
    assert out.read_bytes() == GOLDEN.read_bytes(), "the writer's output changed: a format change needs a version bump and new golden bytes"


def test_golden_preamble_is_spelled_out() -> None:
    data = GOLDEN.read_bytes()
    assert data[:8] == bytes.fromhex("89534c4d0d0a1a0a") == MAGIC
    magic, version, flags, manifest_size, data_offset = PREAMBLE.unpack_from(data)
    assert (version, flags) == (2, 0)
    assert data_offset == (32 + manifest_size + 63) // 64 * 64
    assert data[32 + manifest_size : data_offset] == bytes(data_offset - 32 - manifest_size)


def test_golden_file_reads_back_exact_values() -> None:
    with ModelReader(GOLDEN) as reader:
        m = reader.manifest
        assert [(layer.name, layer.kind.value) for layer in m.layers] == [("embeddings", "step"), ("head", "step"), ("table", "rows")]
        assert (m.layers[1].raw_offset, m.layers[2].raw_offset, m.step_count) == (4096, 8192, 2)
        assert [(t.name, t.dtype.value, t.shape, t.raw_offset) for t in m.tensors] == [
            ("w", "i8", (4, 6), 0),
            ("w.scales", "f32", (4,), 64),
            ("table.scales", "f32", (5,), 128),
            ("norm", "f32", (3,), 4096),
            ("table", "i8", (5, 4), 8192),
        ]
        assert [(c.layer_index, c.raw_offset, c.raw_size_bytes) for c in m.chunks] == [
            (0, 0, 24),  # int8 alone: a chunk never mixes dtypes
            (0, 24, 64),
            (0, 88, 60),
            (1, 4096, 12),
            (2, 8192, 8),  # rows 0-1
            (2, 8200, 8),  # rows 2-3
            (2, 8208, 4),  # row 4
        ]
        np.testing.assert_array_equal(reader.read_tensors(0)["w"][0], [-127, -116, -105, -94, -83, -72])  # round(127 * row / max |row|)
        np.testing.assert_array_equal(reader.read_tensors(2)["table"][4], [87, 100, 114, 127])
        np.testing.assert_allclose(reader.read_tensors(0)["table.scales"], np.array([9.5, 5.5, 1.5, 5.5, 9.5]) / 4 / 127, rtol=1e-6)
        dequantized = dict(read_dequantized(reader))
        np.testing.assert_allclose(dequantized["table"], (np.arange(20).reshape(5, 4) - 9.5) / 4, atol=10.5 / 4 / 254)
        assert reader.verify() == []
        assert m.digest == hashlib.sha256(GOLDEN.read_bytes()[32 : 32 + m.size_bytes]).hexdigest()


def test_version_1_file_still_reads_back_exact_values() -> None:
    """Version 1 (no row tables: the token table in layer 0) is read as it was written."""
    data = GOLDEN_V1.read_bytes()
    assert PREAMBLE.unpack_from(data)[1] == 1
    with ModelReader(GOLDEN_V1) as reader:
        m = reader.manifest
        assert [(layer.name, layer.kind.value) for layer in m.layers] == [("embeddings", "step"), ("head", "step")]
        assert [(c.layer_index, c.raw_offset, c.raw_size_bytes) for c in m.chunks] == [(0, 0, 24), (0, 24, 56), (1, 4096, 12)]
        layer0 = reader.read_tensors(0)
        np.testing.assert_array_equal(layer0["w"][0], [-127, -116, -105, -94, -83, -72])
        np.testing.assert_allclose(layer0["w.scales"], np.array([11.5, 5.5, 5.5, 11.5]) / 8 / 127, rtol=1e-6)
        np.testing.assert_array_equal(reader.read_tensors(1)["norm"], [1.0, -2.0, 0.5])
        assert reader.verify() == []
