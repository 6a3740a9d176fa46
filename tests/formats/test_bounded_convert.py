"""Conversion in bounded memory: row blocks give the same bytes as whole tensors, memory follows the block, not the model."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from streamload.errors import ConversionInputError, UsageError, WriterStageError
from streamload.formats import ModelReader, ModelWriter, convert
from streamload.formats.constants import DType, QuantScheme
from streamload.formats.page_cache import PageReleasingFile, copy_releasing
from streamload.formats.progressive_convert import ShiftChoice
from streamload.formats.quantize import quantize_int8_rows, quantize_row_block
from streamload.formats.safetensors_source import SafetensorsFile
from tests.support.synthetic import llama_config, write_synthetic_llama

FORMATS = Path(__file__).resolve().parents[2] / "formats"


def test_row_blocks_quantize_exactly_like_the_whole_matrix() -> None:
    weight = np.random.default_rng(0).standard_normal((37, 19)).astype(np.float16)
    weight[5] = 0  # a zero row: scale 0
    q, scales, report = quantize_int8_rows(weight)
    parts = [quantize_row_block(weight[start : start + 4]) for start in range(0, 37, 4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), q)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), scales)
    assert max(p[2].max_abs_error for p in parts) == report.max_abs_error
    assert max(p[2].max_rel_error for p in parts) == report.max_rel_error


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_read_rows_equals_the_mapped_tensor(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    f32 = {"m": rng.standard_normal((9, 5)).astype(np.float32), "v": rng.standard_normal(7).astype(np.float32)}
    if dtype == "bfloat16":  # written by hand: the numpy backend of safetensors has no bf16
        path = _write_bf16(tmp_path / "w.safetensors", f32)
    else:
        path = tmp_path / "w.safetensors"
        save_file({n: a.astype(dtype) for n, a in f32.items()}, str(path))
    source = SafetensorsFile(path)
    for name, rows in (("m", 9), ("v", 7)):
        whole = source.array(name)
        pieces = [source.read_rows(name, start, min(rows, start + 2)) for start in range(0, rows, 2)]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)
        assert pieces[0].dtype == whole.dtype


def _write_bf16(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    header, blobs, offset = {}, [], 0
    for name, values in arrays.items():
        raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))
    return path


@pytest.mark.parametrize("coarse_shift", [None, 4])
def test_writer_rows_in_blocks_write_the_same_file_as_a_whole_tensor(tmp_path: Path, coarse_shift: int | None) -> None:
    q, scales, report = quantize_int8_rows(np.random.default_rng(2).standard_normal((50, 24)).astype(np.float32))
    norm = np.linspace(0.5, 1.5, 24, dtype=np.float32)
    for way in ("whole", "blocks"):
        with ModelWriter(tmp_path / f"{way}.slm", config={"architecture": "tiny"}, chunk_size_bytes=256, threads=1) as w:
            w.begin_layer("embeddings")
            w.add_tensor("norm", norm)
            w.end_layer()
            w.begin_layer("block.0")
            if way == "whole":
                w.add_tensor("w", q, quant=QuantScheme.INT8_ROW, scales="w.scales", error=report, coarse_shift=coarse_shift)
            else:
                w.begin_tensor("w", q.shape, DType.I8, quant=QuantScheme.INT8_ROW, scales="w.scales", coarse_shift=coarse_shift)
                for start in range(0, 50, 7):
                    w.add_rows(q[start : start + 7])
                w.end_tensor(report)
            w.add_tensor("w.scales", scales)
            w.end_layer()
            w.finish()
    assert (tmp_path / "whole.slm").read_bytes() == (tmp_path / "blocks.slm").read_bytes()


def test_writer_refuses_rows_that_do_not_fit_the_tensor(tmp_path: Path) -> None:
    w = ModelWriter(tmp_path / "m.slm", config={"architecture": "tiny"})
    w.begin_layer("a")
    with pytest.raises(WriterStageError, match="cannot add rows while in a layer") as raised:
        w.add_rows(np.zeros((1, 4), np.float32))
    assert isinstance(raised.value, RuntimeError)  # existing `except RuntimeError` keeps working
    w.begin_tensor("t", (3, 4), DType.F32)
    with pytest.raises(UsageError, match=r"\(1, 3\) is not whole rows"):
        w.add_rows(np.zeros((1, 3), np.float32))
    w.add_rows(np.zeros((2, 4), np.float32))
    with pytest.raises(UsageError, match="8 of its 12 values were added"):
        w.end_tensor()
    with pytest.raises(UsageError, match="not whole rows of the"):
        w.add_rows(np.zeros((2, 4), np.float32))  # one row too many
    w.add_rows(np.zeros((1, 4), np.float32))
    w.end_tensor()
    with pytest.raises(ValueError, match="duplicate tensor name 't'"):
        w.add_tensor("t", np.zeros(3, np.float32))
    w.abort()


def _streamer_module():  # the module that reads row blocks (imported by the converter)
    return sys.modules["streamload.formats.tensor_streamer"]


def test_one_row_blocks_convert_to_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=2, tie_word_embeddings=True), dtype="float16")
    convert(source, tmp_path / "big-blocks.slm")
    monkeypatch.setattr(_streamer_module(), "ROW_BLOCK_BYTES", 1)  # one row at a time
    convert(source, tmp_path / "one-row.slm")
    assert (tmp_path / "big-blocks.slm").read_bytes() == (tmp_path / "one-row.slm").read_bytes()


def test_conversion_memory_follows_the_row_block_not_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16 MB fp16 token table: whole-tensor quantization holds its 8 MB int8 copy and 4096-row float32 temporaries
    (about 28 MB); 64 KiB row blocks and 64 KiB chunks hold under 6 MB at any moment (tracemalloc sees numpy's buffers)."""
    config = llama_config(num_hidden_layers=1, vocab_size=32768, hidden_size=256, intermediate_size=512, tie_word_embeddings=True)
    source = write_synthetic_llama(tmp_path / "src", config, dtype="float16")
    source_bytes = (source / "model.safetensors").stat().st_size
    monkeypatch.setattr(_streamer_module(), "ROW_BLOCK_BYTES", 64 << 10)
    tracemalloc.start()
    try:
        convert(source, tmp_path / "m.slm", chunk_size_bytes=64 << 10, threads=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert source_bytes > 16e6
    assert peak < 6e6, f"peak {peak / 1e6:.1f} MB of Python and numpy allocations"
    with ModelReader(tmp_path / "m.slm") as reader:
        assert reader.verify() == []


def test_progressive_needs_a_calibrator_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=2))
    with pytest.raises(UsageError, match="needs a calibrator"):
        convert(source, tmp_path / "m.slm", progressive=True)

    def every_matrix_at_shift_4(steps: list, table: tuple) -> ShiftChoice:
        assert isinstance(table[0], np.ndarray) and table[0].dtype == np.int8 and not table[0].flags.writeable  # mapped
        return ShiftChoice([{n: 4 for n, (v, s) in step.items() if s is not None} if i > 0 else {} for i, step in enumerate(steps)])

    convert(source, tmp_path / "m.slm", progressive=True, calibrator=lambda *_: every_matrix_at_shift_4)
    with ModelReader(tmp_path / "m.slm") as reader:
        assert reader.manifest.progressive and reader.verify() == []
        assert {t.coarse_shift for t in reader.manifest.tensors if t.layer_index == 1 and t.quant is QuantScheme.INT8_ROW} == {4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.slm", "src"]


def test_formats_imports_nothing_of_streamload_but_the_errors() -> None:
    for module in sorted(FORMATS.glob("*.py")):
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                assert node.module == "errors" and node.level == 2, f"{module.name}:{node.lineno} imports ..{node.module}"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [alias.name for alias in node.names]
                assert not any(str(n).split(".")[0] in {"streamload", "server"} for n in names), f"{module.name}:{node.lineno}"


def test_convert_level_is_deprecated_but_still_accepted(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1))
    streamload = Path(sys.executable).with_name("streamload")
    done = subprocess.run(
        [str(streamload), "convert", str(source), "-o", str(tmp_path / "a.slm"), "--level", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "--level is deprecated" in done.stderr
    convert(source, tmp_path / "b.slm")
    assert (tmp_path / "a.slm").read_bytes() == (tmp_path / "b.slm").read_bytes()
    assert "--level" not in subprocess.run([str(streamload), "convert", "--help"], capture_output=True, text=True, timeout=60).stdout


def test_a_nan_in_the_token_table_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source = write_synthetic_llama(tmp_path / "src", llama_config(num_hidden_layers=1), dtype="float16")
    tensors = SafetensorsFile(source / "model.safetensors")
    arrays = {name: np.array(tensors.array(name)) for name in tensors.names()}
    arrays["model.embed_tokens.weight"][3, 1] = np.nan
    save_file(arrays, str(source / "model.safetensors"))
    with pytest.raises(ConversionInputError, match=r"tensor 'model\.embed_tokens\.weight': weight has NaN or infinite values"):
        convert(source, tmp_path / "m.slm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_calibration_loss_in_row_blocks_equals_the_whole_comparison() -> None:
    from streamload.calibrate import LOSS_ROWS, CalibratedShifts

    rng = np.random.default_rng(3)
    exact = rng.standard_normal((3 * LOSS_ROWS + 5, 37)).astype(np.float32)
    other = exact + rng.standard_normal(exact.shape).astype(np.float32) * np.float32(0.1)
    whole = float(np.mean(1.0 - (exact * other).sum(axis=-1) / (np.linalg.norm(exact, axis=-1) * np.linalg.norm(other, axis=-1))))
    assert CalibratedShifts._loss(exact, other) == whole  # exactly: a progressive file's bytes depend on it


def _cached_fraction(path: Path) -> float:
    """The fraction of a file's pages in the page cache (mincore on a private mapping, which reports the file's pages)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        anchor = ctypes.c_char.from_buffer(mapped)
        vector = (ctypes.c_ubyte * pages)()
        assert libc.mincore(ctypes.addressof(anchor), size, vector) == 0, ctypes.get_errno()
        del anchor
    return sum(v & 1 for v in vector) / pages


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
def test_the_final_copy_leaves_neither_file_in_the_page_cache(tmp_path: Path) -> None:
    """The writer's last step copies its data file into the target: a cgroup counts both files' page cache, so what was
    read and written must not stay (a drop of each piece just read left 97% of a sequential read cached)."""
    source = tmp_path / "data"
    with open(source, "wb") as f:
        for _ in range(64):
            f.write(np.random.default_rng(0).bytes(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    with open(source, "rb") as f:
        os.read(f.fileno(), 1 << 20)  # one piece cached: the check below can see a cached page
    assert _cached_fraction(source) > 0
    with open(source, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    target = PageReleasingFile(tmp_path / "target", "wb")
    with target.file, open(source, "rb") as data:
        copy_releasing(data, target)
        target.release(target.file.tell())
    assert _cached_fraction(source) < 0.1
    assert _cached_fraction(tmp_path / "target") < 0.1
