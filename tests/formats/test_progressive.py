"""Progressive tensors (format version 3): coarse levels in pass 0, refinements after every step, golden bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamload import errors
from streamload.formats import ModelReader, ModelWriter, QuantScheme
from streamload.formats.constants import COARSE_SHIFTS, PREAMBLE, REFINEMENT_PASS, LayerKind
from streamload.formats.quantize import coarse_levels, fold_refinement, quantize_int8_rows, split_coarse
from tests.support.mutate import join_file, split_file

GOLDEN_PROGRESSIVE = Path(__file__).parent / "golden" / "tiny-progressive.slm"
EVERY_INT8 = np.arange(-127, 128, dtype=np.int16).astype(np.int8)


@pytest.mark.parametrize("shift", list(COARSE_SHIFTS))
def test_coarse_plus_refinement_is_exactly_the_int8_value(shift: int) -> None:
    coarse, refinement = split_coarse(EVERY_INT8, shift)
    assert np.array_equal(coarse.astype(np.int16) + refinement, EVERY_INT8)
    assert np.array_equal(coarse_levels(coarse, shift), coarse)  # a level is its own level
    assert np.all(coarse % (1 << shift) == 0)
    assert len(np.unique(coarse)) == 2 * (127 >> shift) + 1  # k = 8 - shift bits, sign-magnitude
    near_zero = np.abs(EVERY_INT8.astype(np.int16)) < (1 << (shift - 1))
    assert np.all(coarse[near_zero] == 0) and np.all(coarse[~near_zero] != 0)  # an exact zero bucket, and only it


@pytest.mark.parametrize("shift", list(COARSE_SHIFTS))
def test_folding_is_idempotent(shift: int) -> None:
    coarse, refinement = split_coarse(EVERY_INT8, shift)
    once = fold_refinement(coarse, refinement, shift)
    assert np.array_equal(once, EVERY_INT8)
    assert np.array_equal(fold_refinement(once, refinement, shift), EVERY_INT8)  # a crash between fold and journal


def write_tiny_progressive(path: Path, *, progressive: bool = True) -> None:
    """Two steps with an int8 matrix each (one progressive, 2 refinement chunks of 64 bytes), a row table; 64-byte chunks."""
    first = (np.arange(96, dtype=np.float32).reshape(8, 12) - 47.5) / 16
    second = np.cos(np.arange(40, dtype=np.float32)).reshape(4, 10)
    table = (np.arange(20, dtype=np.float32).reshape(5, 4) - 9.5) / 4
    quantized = [quantize_int8_rows(m) for m in (first, second, table)]
    with ModelWriter(path, config={"architecture": "tiny"}, chunk_size_bytes=64, zstd_level=3, threads=1) as w:
        for index, name in enumerate(("embeddings", "head")):
            q, scales, error = quantized[index]
            w.begin_layer(name)
            shift = (3 if index == 0 else 4) if progressive else None
            w.add_tensor(f"w{index}", q, quant=QuantScheme.INT8_ROW, scales=f"w{index}.scales", error=error, coarse_shift=shift)
            w.add_tensor(f"w{index}.scales", scales)
            if index == 0:
                w.add_tensor("table.scales", quantized[2][1])
            w.end_layer()
        w.begin_layer("table", kind=LayerKind.ROWS, chunk_size_bytes=8)
        w.add_tensor("table", quantized[2][0], quant=QuantScheme.INT8_ROW, scales="table.scales", error=quantized[2][2])
        w.end_layer()
        w.finish()


def test_writer_reproduces_golden_progressive_bytes(tmp_path: Path) -> None:
    out = tmp_path / "tiny.slm"
    write_tiny_progressive(out)
    assert out.read_bytes() == GOLDEN_PROGRESSIVE.read_bytes(), "the writer's output changed: a format change needs new golden bytes"


def test_golden_progressive_layout() -> None:
    data = GOLDEN_PROGRESSIVE.read_bytes()
    assert PREAMBLE.unpack_from(data)[1] == 3  # a progressive file is version 3: a version-2 reader would run it coarse
    with ModelReader(GOLDEN_PROGRESSIVE) as reader:
        manifest = reader.manifest
        assert [t.coarse_shift for t in manifest.tensors if t.coarse_shift] == [3, 4]
        order = [(c.pass_index, manifest.layers[c.layer_index].kind) for c in manifest.file_order_chunks()]
        steps, refinements, rows = (
            [o for o in order if o == (0, LayerKind.STEP)],
            [o for o in order if o[0] == REFINEMENT_PASS],
            [o for o in order if o[1] is LayerKind.ROWS],
        )
        assert order == steps + refinements + rows  # every coarse level, then the refinements, then the row table
        assert [c.raw_size_bytes for c in manifest.refinement_chunks] == [64, 32, 40]


def test_reader_folds_refinements_to_the_plain_files_values(tmp_path: Path) -> None:
    plain = tmp_path / "plain.slm"
    write_tiny_progressive(plain, progressive=False)
    assert PREAMBLE.unpack_from(plain.read_bytes())[1] == 2  # no progressive tensor: still readable by version 2
    with ModelReader(plain) as a, ModelReader(GOLDEN_PROGRESSIVE) as b:
        for layer in range(len(a.manifest.layers)):
            exact, progressive = a.read_tensors(layer), b.read_tensors(layer)
            coarse = b.read_tensors(layer, coarse=True)
            for name, values in exact.items():
                assert np.array_equal(progressive[name], values), name
                shift = b.manifest.tensor(name).coarse_shift
                expected = values if shift is None else coarse_levels(values, shift)
                assert np.array_equal(coarse[name], expected), name
        assert b.verify() == []


def refine_entries(manifest: dict) -> list[dict]:
    return [c for c in manifest["chunks"] if c.get("pass") == REFINEMENT_PASS]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda m: m["tensors"][0].update(coarse_shift=7), "coarse_shift 7"),
        (lambda m: m["tensors"][0].update(coarse_shift=True), "coarse_shift True"),
        (lambda m: m["tensors"][1].update(coarse_shift=3), "not an int8_row tensor"),  # w0.scales, f32
        (lambda m: m["tensors"][3].update(coarse_shift=None), "must lie inside one progressive tensor"),
        (lambda m: refine_entries(m)[1].update(raw_offset=60), "tile their tensor"),
        (lambda m: refine_entries(m)[1].update(raw_size=16), "not fully covered"),
        (lambda m: refine_entries(m)[2].update(layer=0), "outside its layer"),
    ],
)
def test_bad_progressive_manifests_are_refused(mutate, match: str) -> None:
    manifest, region = split_file(GOLDEN_PROGRESSIVE.read_bytes())
    mutate(manifest)
    path_bytes = join_file(manifest, region)
    with pytest.raises(errors.FormatError, match=match):
        from streamload.formats.reader import read_header

        read_header(path_bytes, len(path_bytes))
