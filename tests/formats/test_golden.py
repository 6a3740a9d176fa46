"""Golden bytes: a tiny model whose every byte is pinned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from streamload.formats import ModelReader, ModelWriter, QuantScheme
from streamload.formats.constants import MAGIC, PREAMBLE
from streamload.formats.quantize import quantize_int8_rows

GOLDEN = Path(__file__).parent / "golden" / "tiny.slm"


def write_tiny(path: Path) -> None:
    """Two layers: an int8 matrix with its scales, then a float vector; 64-byte chunks."""
    weight = (np.arange(24, dtype=np.float32).reshape(4, 6) - 11.5) / 8
    q, scales, error = quantize_int8_rows(weight)
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
        w.end_layer()
        w.begin_layer("head")
        w.add_tensor("norm", np.array([1.0, -2.0, 0.5], dtype=np.float32))
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
    assert (version, flags) == (1, 0)
    assert data_offset == (32 + manifest_size + 63) // 64 * 64
    assert data[32 + manifest_size : data_offset] == bytes(data_offset - 32 - manifest_size)


def test_golden_file_reads_back_exact_values() -> None:
    with ModelReader(GOLDEN) as reader:
        m = reader.manifest
        assert [layer.name for layer in m.layers] == ["embeddings", "head"]
        assert m.layers[1].raw_offset == 4096
        assert [(t.name, t.dtype.value, t.shape, t.raw_offset) for t in m.tensors] == [
            ("w", "i8", (4, 6), 0),
            ("w.scales", "f32", (4,), 64),
            ("norm", "f32", (3,), 4096),
        ]
        assert [(c.layer_index, c.raw_offset, c.raw_size_bytes) for c in m.chunks] == [(0, 0, 24), (0, 24, 56), (1, 4096, 12)]
        layer0 = reader.read_tensors(0)
        np.testing.assert_array_equal(layer0["w"][0], [-127, -116, -105, -94, -83, -72])  # round(127 * row / max |row|)
        np.testing.assert_allclose(layer0["w.scales"], np.array([11.5, 5.5, 5.5, 11.5]) / 8 / 127, rtol=1e-6)
        np.testing.assert_array_equal(reader.read_tensors(1)["norm"], [1.0, -2.0, 0.5])
        assert reader.verify() == []
        assert m.digest == hashlib.sha256(GOLDEN.read_bytes()[32 : 32 + m.size_bytes]).hexdigest()
