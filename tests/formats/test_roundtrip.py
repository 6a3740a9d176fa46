"""Write then read: exact values, determinism, the writer's state machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamload.formats import ModelReader, ModelWriter, QuantScheme
from streamload.formats.constants import LAYER_ALIGNMENT, TENSOR_ALIGNMENT
from streamload.formats.quantize import quantize_int8_rows


def write_random_model(path: Path, seed: int, chunk_size_bytes: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    written: dict[str, np.ndarray] = {}
    with ModelWriter(path, config={"architecture": "test"}, chunk_size_bytes=chunk_size_bytes, threads=2) as w:
        for layer in range(4):
            w.begin_layer(f"layer{layer}")
            rows, cols = rng.integers(1, 70, size=2)
            q, scales, error = quantize_int8_rows(rng.standard_normal((rows, cols)).astype(np.float32))
            w.add_tensor(f"l{layer}.w", q, quant=QuantScheme.INT8_ROW, scales=f"l{layer}.s", error=error)
            w.add_tensor(f"l{layer}.s", scales)
            half = rng.standard_normal(int(rng.integers(1, 300))).astype(np.float16)
            w.add_tensor(f"l{layer}.h", half)
            written |= {f"l{layer}.w": q, f"l{layer}.s": scales, f"l{layer}.h": half}
            w.end_layer()
        w.begin_layer("empty")
        w.end_layer()
        w.finish()
    return written


@pytest.mark.parametrize("chunk_size_bytes", [1, 7, 64, 1 << 20])
def test_round_trip_is_exact(tmp_path: Path, chunk_size_bytes: int) -> None:
    path = tmp_path / "m.slm"
    written = write_random_model(path, seed=chunk_size_bytes, chunk_size_bytes=chunk_size_bytes)
    with ModelReader(path) as reader:
        assert reader.verify() == []
        read: dict[str, np.ndarray] = {}
        for layer in reader.manifest.layers:
            assert layer.raw_offset % LAYER_ALIGNMENT == 0
            read |= reader.read_tensors(layer.index)
        for entry in reader.manifest.tensors:
            assert entry.raw_offset % TENSOR_ALIGNMENT == 0
        assert all(c.raw_size_bytes <= chunk_size_bytes for c in reader.manifest.chunks)
    assert read.keys() == written.keys()
    for name, values in written.items():
        assert read[name].dtype == values.dtype
        np.testing.assert_array_equal(read[name], values)


def test_same_input_gives_byte_identical_files(tmp_path: Path) -> None:
    write_random_model(tmp_path / "a.slm", seed=5, chunk_size_bytes=100)
    write_random_model(tmp_path / "b.slm", seed=5, chunk_size_bytes=100)
    assert (tmp_path / "a.slm").read_bytes() == (tmp_path / "b.slm").read_bytes()


def test_chunks_hold_one_dtype_each(tmp_path: Path) -> None:
    path = tmp_path / "m.slm"
    write_random_model(path, seed=1, chunk_size_bytes=1 << 20)
    with ModelReader(path) as reader:
        m = reader.manifest
        for chunk in m.chunks:
            inside = {t.dtype for t in m.tensors if t.raw_offset < chunk.raw_offset + chunk.raw_size_bytes and t.raw_end > chunk.raw_offset}
            assert len(inside) == 1


def test_writer_refuses_out_of_order_calls(tmp_path: Path) -> None:
    w = ModelWriter(tmp_path / "m.slm", config={"architecture": "test"})
    with pytest.raises(RuntimeError, match="cannot add a tensor while between layers"):
        w.add_tensor("x", np.zeros(3, np.float32))
    w.begin_layer("a")
    with pytest.raises(RuntimeError, match="cannot finish while in a layer"):
        w.finish()
    with pytest.raises(ValueError, match="only float32, float16 and int8"):
        w.add_tensor("x", np.zeros(3, np.float64))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError):
        with ModelWriter(tmp_path / "m.slm", config={"architecture": "test"}) as w:
            w.begin_layer("a")
            w.add_tensor("x", np.zeros(3, np.float32))
            raise ZeroDivisionError("a failure while writing")
    assert list(tmp_path.iterdir()) == []
