"""A progressive model streamed: a preview from the coarse levels first, then the exact result, bit for bit the plain
file's; refinements folded into the cache in place, and a cache that checks itself still finds damage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import streamload
from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD
from streamload.calibrate import CalibratedShifts
from streamload.formats import ModelReader, convert
from streamload.formats.constants import REFINEMENT_PASS
from streamload.formats.quantize import coarse_levels
from streamload.runtime import run, run_progressive
from tests.support.checks import assert_cache_exact
from tests.support.faulty import Faults, faulty_app
from tests.support.paths import FIXTURES
from tests.support.previews import assert_preview_then_exact
from tests.support.serving import ServerThread, serve_directory

SENTENCE = "Streaming lets a phone start computing before the download ends."


INT8_ONLY = {"float_weights_bytes": 0}  # the same compute path on every run (no float32 copies), so results compare bit for bit


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


async def test_the_preview_comes_first_and_the_exact_result_is_the_plain_files(progressive_www: Path, tmp_path: Path) -> None:
    path = progressive_www / "minilm-p.slm"
    with serve_directory(progressive_www, rate_bytes_per_s=path.stat().st_size / 3.0) as server:
        async with streamload.open(server.url("minilm-p.slm"), cache_dir=tmp_path / "p") as model:
            results = [result async for result in run_progressive(model, texts=[SENTENCE], **INT8_ONLY)]
            coarse_ready = model.layer_coarse_ready_s
            exact_ready = model.layer_ready_s
        async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path / "plain") as model:
            plain = await run(model, texts=[SENTENCE], **INT8_ONLY)
    preview, exact = results
    assert (preview.precision, exact.precision) == ("coarse", "exact")
    assert np.array_equal(exact.embedding, plain.embedding)  # bit for bit
    assert preview.total_s < exact.total_s and preview.bytes_needed < 0.75 * exact.bytes_needed
    assert cosines(preview.embedding, exact.embedding)[0] > 0.95
    blocks = range(1, 7)
    assert all(coarse_ready[i] is not None and exact_ready[i] is not None and coarse_ready[i] < exact_ready[i] for i in blocks)
    assert max(coarse_ready[i] for i in blocks) < min(exact_ready[i] for i in blocks)  # every coarse level before any refinement


async def test_preview_quality_on_varied_sentences(progressive_www: Path, tmp_path: Path) -> None:
    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    reference = np.load(FIXTURES / "minilm_varied_reference.npy")  # PyTorch fp32 (tools/make_reference.py)
    async with streamload.open(progressive_www / "minilm-p.slm", cache_dir=tmp_path) as model:
        await model.wait_complete()
        preview = await run(model.coarse(), texts=sentences, **INT8_ONLY)
        exact = await run(model, texts=sentences, **INT8_ONLY)
    assert cosines(exact.embedding, reference).min() > 0.999
    to_reference = cosines(preview.embedding, reference)
    assert to_reference.mean() >= 0.98 and to_reference.min() > 0.95


def drop_refinement_records(cache: Path, path: Path) -> int:
    """Rewrite the journal without the refinements' records, as after a crash between folding them and journaling."""
    with ModelReader(path) as reader:
        refinements = {c.index for c in reader.manifest.refinement_chunks if c.pass_index == REFINEMENT_PASS}
    journal = next(cache.glob(f"models/*/{JOURNAL_NAME}"))
    records = list(JOURNAL_RECORD.iter_unpack(journal.read_bytes()))
    kept = [r for r in records if r[0] not in refinements]
    journal.write_bytes(b"".join(JOURNAL_RECORD.pack(*r) for r in kept))
    (journal.parent / "complete").unlink(missing_ok=True)
    return len(records) - len(kept)


async def test_refinements_folded_but_not_journaled_are_folded_again_exactly(progressive_www: Path, tmp_path: Path) -> None:
    path = progressive_www / "minilm-p.slm"
    async with streamload.open(path, cache_dir=tmp_path) as model:
        await model.wait_complete()
    dropped = drop_refinement_records(tmp_path, path)
    with ModelReader(path) as reader:
        assert dropped == len(reader.manifest.refinement_chunks) > 20  # every refinement chunk was journaled, and is no more
    async with streamload.open(path, cache_dir=tmp_path) as model:
        stats = await model.wait_complete()
        assert stats.chunks_fetched == dropped  # only the refinements, folded a second time into exact values
    assert_cache_exact(tmp_path, path)


async def test_a_damaged_coarse_level_is_fetched_again_with_its_refinements(progressive_www: Path, tmp_path: Path) -> None:
    path = progressive_www / "minilm-p.slm"
    async with streamload.open(path, cache_dir=tmp_path) as model:
        await model.wait_complete()
    with ModelReader(path) as reader:
        tensor = next(t for t in reader.manifest.tensors if t.coarse_shift is not None and t.layer_index == 3)
        shift = tensor.coarse_shift
    store = next(tmp_path.glob("models/*/store.bin"))
    data = bytearray(store.read_bytes())
    value = np.int8(data[tensor.raw_offset] if data[tensor.raw_offset] < 128 else data[tensor.raw_offset] - 256)
    changed = np.int8(coarse_levels(np.array([value]), shift)[0] ^ 64)  # another coarse level: a change the check must see
    data[tensor.raw_offset] = int(changed) & 0xFF
    store.write_bytes(bytes(data))
    async with streamload.open(path, cache_dir=tmp_path) as model:
        layer = await model.layer(tensor.layer_index)
        with ModelReader(path) as reader:
            np.testing.assert_array_equal(layer[tensor.name], reader.read_tensors(tensor.layer_index)[tensor.name])
        assert model.stats.chunks_fetched >= 2  # the coarse chunk, then the refinement folded into it again
    assert_cache_exact(tmp_path, path)


async def test_a_server_that_ignores_range_streams_a_progressive_model_exactly(progressive_www: Path, tmp_path: Path) -> None:
    path = progressive_www / "minilm-p.slm"
    with serve_directory(progressive_www, ranges_enabled=False) as server:
        async with streamload.open(server.url("minilm-p.slm"), cache_dir=tmp_path) as model:
            results = [r async for r in run_progressive(model, texts=[SENTENCE])]
            await model.wait_complete()
    assert [r.precision for r in results][-1] == "exact"
    assert_cache_exact(tmp_path, path)


def test_run_progressive_prints_both_results(progressive_www: Path, tmp_path: Path) -> None:
    path = progressive_www / "minilm-p.slm"
    with serve_directory(progressive_www, rate_bytes_per_s=path.stat().st_size / 3.0) as server:
        command = [sys.executable, "-m", "streamload.cli", "run", server.url("minilm-p.slm"), "--text", SENTENCE, "--progressive"]
        env = {"STREAMLOAD_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
        done = subprocess.run([*command, "--json", "--no-finish"], capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        text = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**env, "STREAMLOAD_CACHE": str(tmp_path / "c2")})
    assert out["precision"] == "exact" and out["preview"]["precision"] == "coarse"
    assert out["preview"]["total_s"] < out["total_s"] and out["preview"]["bytes_needed"] < out["bytes_needed"]
    assert 0.95 < out["preview"]["cosine_to_exact"] <= 1.0
    assert len(out["preview"]["embedding"]) == len(out["embedding"]) == 384
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("[") for line in lines)  # the preview's embedding, then the exact one
    assert "preview (coarse weights) result at" in text.stderr and "exact result at" in text.stderr


def test_inspect_shows_the_tiers(progressive_www: Path) -> None:
    command = [sys.executable, "-m", "streamload.cli", "inspect", "--json"]
    tiers = json.loads(subprocess.run([*command, str(progressive_www / "minilm-p.slm")], capture_output=True, check=True).stdout)[
        "progressive"
    ]
    plain = json.loads(subprocess.run([*command, str(progressive_www / "minilm.slm")], capture_output=True, check=True).stdout)
    assert plain["progressive"] is None
    assert plain["format_version"] == 2  # the file's own, from its preamble
    progressive_payload = json.loads(
        subprocess.run([*command, str(progressive_www / "minilm-p.slm")], capture_output=True, check=True).stdout
    )["int8_payload"]
    assert progressive_payload is not None
    # the int8 payload counts the refinements: the same weights in two planes, so no fewer bytes than in one
    assert (
        plain["int8_payload"]["compressed_bytes"]
        < progressive_payload["compressed_bytes"]
        < 1.05 * plain["int8_payload"]["compressed_bytes"]
    )
    steps = sum(layer["compressed_bytes"] for layer in plain["layers"] if layer["kind"] == "step")
    assert tiers["coarse_tier_bytes"] < 0.8 * steps < tiers["coarse_tier_bytes"] + tiers["refinement_bytes"]
    with ModelReader(progressive_www / "minilm-p.slm") as reader:
        int8 = [t for t in reader.manifest.tensors if t.scales is not None]
    assert tiers["progressive_matrices"] == sum(1 for t in int8 if t.coarse_shift) > 20
    assert tiers["progressive_matrices"] + tiers["exact_matrices"] == len(int8)
    assert 0.97 < tiers["preview_cosine_on_calibration"] < 1.0
    text = subprocess.run([*command[:-1], str(progressive_www / "minilm-p.slm")], capture_output=True, text=True, check=True).stdout
    assert "preview tier" in text and "on the calibration text" in text


async def test_a_decoder_previews_its_first_token_then_generates_exactly(llama_dir: Path, llama_slm: Path, tmp_path: Path) -> None:
    progressive = tmp_path / "www" / "llama-p.slm"
    progressive.parent.mkdir()
    convert(llama_dir, progressive, chunk_size_bytes=16 << 10, progressive=True, calibrator=CalibratedShifts)
    await assert_preview_then_exact(progressive, llama_slm, [1, 17, 300, 45, 99, 4], tmp_path)


async def test_a_refinement_whose_coarse_chunk_fails_its_hash_is_fetched_again_after_it(progressive_www: Path, tmp_path: Path) -> None:
    """Without Range the whole file is one span: a refinement waits in the pipeline for the coarse chunk under it, and
    when that one fails its sha256 the refinement is refused too, not folded into bytes that are not there."""
    path = progressive_www / "minilm-p.slm"
    with ModelReader(path) as reader:
        refinement = next(c for c in reader.manifest.refinement_chunks if c.layer_index == 2)
        base = next(c for c in reader.manifest.chunks if c.layer_index == 2 and c.raw_offset <= refinement.raw_offset < c.raw_end)
        start = reader.preamble.data_offset + base.offset
    faults = Faults(script=["full"] * 10, corrupt_range=(start, start + base.size_bytes), corrupt_times=1)
    with ServerThread(faulty_app(path, faults)) as server:
        async with streamload.open(server.url("minilm-p.slm"), cache_dir=tmp_path) as model:
            stats = await model.wait_complete()
    assert stats.integrity_failures >= 2  # the coarse chunk, and the refinement that would have been folded into it
    assert len(faults.requests) >= 2 and faults.actions[0] == "full"
    assert_cache_exact(tmp_path, path)
