"""The numpy runtime against fp32 references from PyTorch (tools/make_reference.py), and streaming execution."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import threadpoolctl

import streamload
from streamload.cli import main
from streamload.errors import UsageError
from streamload.formats import convert
from streamload.formats.quantize import quantize_int8_rows
from streamload.runtime import bert, decoder, generate, ops, run
from streamload.runtime import timeline as timeline_module
from streamload.runtime.ops import matmul
from tests.support.paths import FIXTURES
from tests.support.serving import ServerThread, serve_directory


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, minilm_slm: Path) -> Iterator[tuple[ServerThread, Path]]:
    directory = tmp_path_factory.mktemp("runtime-served")
    (directory / "minilm.slm").write_bytes(minilm_slm.read_bytes())
    convert(FIXTURES / "llama-tiny", directory / "llama.slm")
    convert(FIXTURES / "llama-tiny", directory / "llama-f32.slm", quant="none")
    with serve_directory(directory) as server:
        yield server, directory


async def test_minilm_streamed_matches_sentence_transformers(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    server, _ = served
    sentences = json.loads((FIXTURES / "minilm_sentences.json").read_text())
    reference = np.load(FIXTURES / "minilm_reference.npy")
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        result = await run(model, texts=sentences)
    assert result.embedding is not None and result.embedding.shape == (16, 384)
    cos = cosine_rows(result.embedding, reference)
    assert cos.mean() >= 0.999 and cos.min() >= 0.998, cos
    assert np.allclose(np.linalg.norm(result.embedding, axis=1), 1.0, atol=1e-5)  # the Normalize module
    assert [t.index for t in result.timeline] == list(range(7))  # embeddings + 6 blocks, in order
    assert [(r.index, r.name) for r in result.row_fetches] == [(8, "embeddings.rows")]  # the input's rows, fetched first


async def test_llama_prompt_logits_and_first_token(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    server, _ = served
    prompt = json.loads((FIXTURES / "llama_prompt.json").read_text())
    reference = np.load(FIXTURES / "llama_reference.npy")
    async with streamload.open(server.url("llama.slm"), cache_dir=tmp_path) as model:
        result = await run(model, ids=prompt["prompt_ids"], max_new_tokens=4, keep_prompt_logits=True)
    assert result.prompt_logits is not None and result.prompt_logits.shape == reference.shape
    assert cosine_rows(result.prompt_logits, reference).min() >= 0.999
    assert result.generated_ids is not None and result.generated_ids[0] == prompt["greedy_next_ids"][0]


async def test_llama_with_float_weights_reproduces_transformers_greedy_decoding(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    """Without quantization error, every decoded token must match: checks RoPE, GQA and the KV cache."""
    server, _ = served
    prompt = json.loads((FIXTURES / "llama_prompt.json").read_text())
    reference = np.load(FIXTURES / "llama_reference.npy")
    async with streamload.open(server.url("llama-f32.slm"), cache_dir=tmp_path) as model:
        result = await run(model, ids=prompt["prompt_ids"], max_new_tokens=len(prompt["greedy_next_ids"]), keep_prompt_logits=True)
    assert cosine_rows(result.prompt_logits, reference).min() >= 0.99999
    np.testing.assert_allclose(result.prompt_logits, reference, atol=2e-4)
    assert result.generated_ids == prompt["greedy_next_ids"]


async def test_compute_starts_while_later_layers_are_on_the_wire(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    _, directory = served
    rate = (directory / "minilm.slm").stat().st_size / 1.0  # about a second for the whole file
    with serve_directory(directory, rate_bytes_per_s=rate) as slow:
        async with streamload.open(slow.url("minilm.slm"), cache_dir=tmp_path) as model:
            result = await run(model, texts=["streaming while downloading"])
    last_ready = max(t.ready_s for t in result.timeline)
    assert result.first_block_done_s is not None and result.first_block_done_s < last_ready
    assert result.first_layer_done_s == result.first_block_done_s  # the old name, kept for one release
    for timing in result.timeline:
        assert timing.ready_s <= timing.compute_start_s <= timing.compute_done_s


def test_cli_run_json_and_saved_logits(served: tuple[ServerThread, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, _ = served
    logits_path = tmp_path / "logits.npy"
    code = main(
        [
            "run",
            server.url("llama.slm"),
            "--cache-dir",
            str(tmp_path),
            "--ids",
            "1,17,300,45",
            "--max-new-tokens",
            "3",
            "--json",
            "--save-logits",
            str(logits_path),
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["generated_ids"]) == 3 and out["text"] is None
    assert out["bytes_downloaded"] > 0 and 0 < out["first_block_done_s"] <= out["total_s"]
    assert out["first_layer_done_s"] == out["first_block_done_s"]  # the old --json key, kept for one release (docs/cli.md)
    assert [t["index"] for t in out["timeline"]] == [0, 1, 2, 3]
    logits = np.load(logits_path)
    assert logits.shape == (4, 512) and logits.dtype == np.float32
    assert main(["run", server.url("minilm.slm"), "--cache-dir", str(tmp_path), "--text", "hello", "--json"]) == 0
    embedding = json.loads(capsys.readouterr().out)["embedding"]
    assert len(embedding) == 384 and math.isclose(float(np.linalg.norm(embedding)), 1.0, rel_tol=1e-5)
    assert main(["run", server.url("minilm.slm"), "--cache-dir", str(tmp_path), "--text", "x", "--save-logits", str(logits_path)]) == 2
    assert "--save-logits needs a decoder" in capsys.readouterr().err
    picture = tmp_path / "timeline.png"
    assert (
        main(
            [
                "run",
                server.url("llama.slm"),
                "--cache-dir",
                str(tmp_path / "fresh"),
                "--ids",
                "1,2",
                "--timeline-png",
                str(picture),
                "--link-rate",
                "1e6",
                "-q",
            ]
        )
        == 0
    )
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000


def test_linear_equals_dequantized_matmul(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((700, 96)).astype(np.float32)
    q, scales, _ = quantize_int8_rows(weight)
    bias = rng.standard_normal(700).astype(np.float32)
    expected_w = q.astype(np.float64) * scales[:, None]
    for tile_elements in (1 << 20, 96 * 64):  # one tile; eleven tiles, the last one short
        monkeypatch.setattr(matmul, "TILE_ELEMENTS", tile_elements)
        monkeypatch.setattr(matmul, "PREFILL_TILE_ELEMENTS", tile_elements)
        for tokens in (1, 40):
            x = rng.standard_normal((tokens, 96)).astype(np.float32)
            np.testing.assert_allclose(ops.linear(x, q, scales, bias), x @ expected_w.T + bias, rtol=1e-4, atol=1e-4)


def test_linear_t_is_linear_with_tokens_as_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    q, scales, _ = quantize_int8_rows(rng.standard_normal((300, 64)).astype(np.float32))
    bias = rng.standard_normal(300).astype(np.float32)
    monkeypatch.setattr(matmul, "TILE_ELEMENTS", 64 * 32)  # ten tiles, the last one short
    for tokens in (1, 19, 40):
        x = rng.standard_normal((tokens, 64)).astype(np.float32)
        expected = ops.linear(x, q, scales, bias)
        np.testing.assert_allclose(ops.linear_t(x.T, q, scales, bias), expected.T, rtol=1e-5, atol=1e-5)
        out = np.full((300, tokens), np.nan, np.float32)
        assert ops.linear_t(np.ascontiguousarray(x.T), q.astype(np.float32) * scales[:, None], None, bias, out=out) is out
        np.testing.assert_allclose(out, expected.T, rtol=1e-5, atol=1e-5)


def test_layer_norm_t_normalizes_columns() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 48)).astype(np.float32) * 3 + 1
    weight, bias = rng.standard_normal(48).astype(np.float32), rng.standard_normal(48).astype(np.float32)
    expected = ops.layer_norm(x.copy(), weight, bias, 1e-12)
    xt = np.ascontiguousarray(x.T)
    assert ops.layer_norm_t(xt, weight, bias, 1e-12, out=xt) is xt
    np.testing.assert_allclose(xt, expected.T, rtol=1e-5, atol=1e-5)


def test_dense_on_float_copies_equals_int8_linear_and_respects_the_budget() -> None:
    rng = np.random.default_rng(1)
    projections = []
    for out_features in (96, 64, 96):
        q, scales, _ = quantize_int8_rows(rng.standard_normal((out_features, 80)).astype(np.float32))
        projections.append((q, scales, rng.standard_normal(out_features).astype(np.float32)))
    x = rng.standard_normal((7, 80)).astype(np.float32)
    expected = np.concatenate([ops.linear(x, *p) for p in projections], axis=1)
    cache = ops.FloatWeightCache(1 << 20)
    np.testing.assert_allclose(ops.dense(x, projections, float_weights=cache), expected, rtol=1e-5, atol=1e-5)
    assert cache.used_bytes == 0  # first use: int8, no copy yet
    fused = ops.dense(x, projections, float_weights=cache)
    assert cache.used_bytes == 4 * 80 * 256 and cache.get(projections) is cache.get(projections)  # made once, on the second use
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-5)
    small = ops.FloatWeightCache(4 * 80 * 100, copy_on_use=1)  # too small for the fused weight: int8 path, nothing kept
    np.testing.assert_allclose(ops.dense(x, projections, float_weights=small), expected, rtol=1e-5, atol=1e-5)
    assert small.used_bytes == 0 and small.get(projections) is None
    assert small.get(projections[:1]) is not None  # a single projection fits
    del projections[:]  # the weights go: so do their float32 copies
    assert cache.used_bytes == 0


def test_float_weight_budget_zero_runs_int8_only() -> None:
    cache = ops.FloatWeightCache(1 << 20, copy_on_use=1)
    q, scales, _ = quantize_int8_rows(np.ones((4, 8), np.float32))
    assert cache.get([(q, scales, None)]) is not None and cache.used_bytes > 0
    cache.set_budget(0)
    assert cache.used_bytes == 0
    assert cache.get([(q, scales, None)]) is None and cache.get([(q, scales, None)]) is None


async def test_two_models_in_one_process_keep_their_own_float_copies(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    """The float32 copies belong to a model: a second model neither sees nor spends the first one's budget."""
    server, _ = served
    async with (
        streamload.open(server.url("minilm.slm"), cache_dir=tmp_path / "a") as first,
        streamload.open(server.url("minilm.slm"), cache_dir=tmp_path / "b") as second,
    ):
        for _ in range(2):  # copies are made on a weight's second use
            await run(first, texts=["one model"], memory_budget_bytes=None)
        await run(second, texts=["another"], memory_budget_bytes=None, float_weights_bytes=0)
        assert first.runtime_state.float_weights.used_bytes > 0
        assert second.runtime_state.float_weights.used_bytes == 0
        assert first.runtime_state.float_weights is not second.runtime_state.float_weights


async def test_minilm_int8_only_and_float_copies_agree_on_varied_sentences(served: tuple[ServerThread, Path], tmp_path: Path) -> None:
    """The 64-sentence fidelity set, in length-sorted batches of 16, both ways of running the weights."""
    server, _ = served
    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    reference = np.load(FIXTURES / "minilm_varied_reference.npy")
    outputs = []
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        for budget in (ops.default_float_weight_budget_bytes(), 0):
            embedding = np.zeros((len(sentences), 384), np.float32)
            for start in range(0, len(order), 16):
                rows = order[start : start + 16]
                result = await run(model, texts=[sentences[i] for i in rows], float_weights_bytes=budget, memory_budget_bytes=None)
                embedding[rows] = result.embedding
            used = model.runtime_state.float_weights.used_bytes
            assert used >= (42_467_328 if budget else 0)  # 6 blocks' matrices as float32, from the second batch on
            outputs.append(embedding)
    assert [t.index for t in result.timeline] == list(range(7))
    assert all(t.ready_s <= t.compute_start_s <= t.compute_done_s for t in result.timeline)
    for embedding in outputs:
        cos = cosine_rows(embedding, reference)
        assert cos.min() >= 0.999 and cos.mean() >= 0.9993, (cos.min(), cos.mean())
    np.testing.assert_allclose(outputs[0], outputs[1], atol=2e-5)


async def test_minilm_one_sentence_at_a_time_pads_its_matmuls_and_keeps_fidelity(
    served: tuple[ServerThread, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batch 1, where the block's matmuls run on zero-padded columns: the same embeddings as without padding."""
    assert [bert.padded_columns(n) for n in (8, 11, 13, 16, 17, 18, 19, 20, 21, 23, 400)] == [8, 12, 16, 16, 17, 18, 20, 20, 24, 24, 400]
    server, _ = served
    sentences = json.loads((FIXTURES / "minilm_varied_sentences.json").read_text())
    reference = np.load(FIXTURES / "minilm_varied_reference.npy")
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        padded = np.concatenate([(await run(model, texts=[s])).embedding for s in sentences])
        monkeypatch.setattr(bert, "padded_columns", lambda tokens: tokens)
        unpadded = np.concatenate([(await run(model, texts=[s])).embedding for s in sentences[:16]])
    cos = cosine_rows(padded, reference)
    assert cos.min() >= 0.999 and cos.mean() >= 0.9993, (cos.min(), cos.mean())
    np.testing.assert_allclose(padded[:16], unpadded, atol=2e-5)


async def test_a_cached_model_runs_its_whole_pass_in_one_hand_off(
    served: tuple[ServerThread, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = served
    hand_offs = []
    to_thread = asyncio.to_thread

    async def counting(fn, /, *args):  # noqa: ANN001, ANN202
        hand_offs.append(fn)
        return await to_thread(fn, *args)

    monkeypatch.setattr(timeline_module.asyncio, "to_thread", counting)
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        result = await run(model, texts=["one hand-off for seven layers"])
    compute = [fn.__qualname__ for fn in hand_offs if fn.__module__.startswith("streamload.runtime")]  # the loader hands off too
    assert compute == ["Timeline.compute_chain.<locals>.chain"] and [t.index for t in result.timeline] == list(range(7))


async def test_a_model_is_validated_once_not_per_call(
    served: tuple[ServerThread, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streamload.formats.architectures import BERT

    server, _ = served
    calls = []
    validate = BERT.validate
    monkeypatch.setattr(type(BERT), "validate", lambda self, *args: calls.append(1) or validate(*args))
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        for _ in range(3):
            await run(model, texts=["the config is checked against the tensors once"])
    assert calls == [1]
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as again:  # the same model opened again: its own check
        await run(again, texts=["checked for this model object"])
    assert calls == [1, 1]


def test_the_tanh_gelu_is_within_5e_4_of_the_exact_one() -> None:
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])  # x * Phi(x), BERT's "gelu"
    assert np.abs(ops.gelu_tanh(x) - exact).max() < 5e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp overflows far left of zero: GELU's limit, -0.0, and no warning
        far = ops.gelu_tanh(np.array([-1e4, -60.0, -12.0, 0.0, 12.0, 60.0], np.float32))
    np.testing.assert_array_equal(far, [0.0, 0.0, 0.0, 0.0, 12.0, 60.0])
    in_place = x.copy()
    ops.gelu_tanh(in_place, out=in_place)
    np.testing.assert_array_equal(in_place, ops.gelu_tanh(x))


def test_sampling() -> None:
    logits = np.array([0.0, 3.0, 1.0, 2.9], np.float32)
    rng = np.random.default_rng(1)
    assert generate.sample(logits, 0.0, 1.0, rng) == 1
    assert generate.sample(logits, 1.0, 1e-6, rng) == 1  # a tiny nucleus is greedy
    draws = {generate.sample(logits, 1.0, 0.9, np.random.default_rng(s)) for s in range(200)}
    assert draws <= {1, 3, 2} and {1, 3} <= draws


def test_llama3_rope_scaling_keeps_high_and_scales_low_frequencies() -> None:
    base = decoder.DecoderConfig(512, 64, 1, 4, 2, 64, 1e-6, 500000.0, None, 8192, False, ())
    scaled = decoder.DecoderConfig(
        512,
        64,
        1,
        4,
        2,
        64,
        1e-6,
        500000.0,
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        8192,
        False,
        (),
    )
    plain, adjusted = decoder.rope_inverse_frequencies(base), decoder.rope_inverse_frequencies(scaled)
    assert adjusted[0] == plain[0]  # short wavelengths untouched
    assert math.isclose(adjusted[-1], plain[-1] / 8.0)  # wavelengths past the original context divided by the factor
    assert np.all(adjusted <= plain)


async def test_the_encoder_refuses_ids_outside_its_vocabulary_and_warns_on_truncation(
    minilm_slm: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with streamload.open(minilm_slm, cache_dir=tmp_path) as model:
        for ids in ([101, 30522], [-1, 101], []):
            with pytest.raises(streamload.RuntimeModelError, match="token id"):
                await run(model, ids=ids)
        result = await run(model, texts=["word " * 300])
        assert result.embedding is not None and result.embedding.shape == (1, 384)
    assert "text 1 longer than the model's 256 tokens: 46 tokens dropped" in caplog.text


def test_a_cached_local_run_imports_only_what_it_needs(minilm_slm: Path, tmp_path: Path) -> None:
    """Cold start: ``streamload run`` on a local file whose layers are cached reads and computes, nothing more: no
    HTTP client, no converter, not the other architecture's runtime, not numpy.ma (np.unique imports it: 7 ms), not the
    fetching machinery (workers, pipeline, group commit, scheduler, sources and hosts, the handover: nothing is
    fetched), not the file commands (convert, inspect, verify, serve), not email (for a Retry-After date)."""
    fill = [sys.executable, "-m", "streamload.cli", "run", str(minilm_slm), "--cache-dir", str(tmp_path), "--text", "cold", "-q"]
    subprocess.run(fill, capture_output=True, check=True)  # the cache filled by another process
    code = (
        "import sys\n"
        "from streamload.cli import main\n"
        f"for _ in range(2): assert main(['run', {str(minilm_slm)!r}, '--cache-dir', {str(tmp_path)!r}, '--text', 'cold', '--json']) == 0\n"
        "unwanted = ('aiohttp', 'streamload.formats.convert', 'streamload.formats.writer', 'streamload.runtime.generate',"
        " 'numpy.ma', 'streamload.download.delta_stream', 'streamload.cache.reuse', 'streamload.download.workers',"
        " 'streamload.download.pipeline', 'streamload.cache.journal', 'streamload.download.schedule',"
        " 'streamload.download.sources', 'streamload.download.hosts', 'streamload.download.landed',"
        " 'streamload.cli.files', 'email.utils')\n"
        "loaded = [m for m in unwanted if m in sys.modules]\n"
        "print('LOADED', loaded, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "LOADED []" in done.stderr, done.stderr[-2000:]


def blas_threads() -> list[int]:
    """The thread count of every loaded BLAS, as threadpoolctl reads it (a test needing one skips without)."""
    libraries = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    if not libraries:
        pytest.skip("threadpoolctl finds no BLAS library to set")
    return [library.get_num_threads() for library in libraries]


def test_decoding_blocks_in_two_threads_give_blas_its_threads_back_when_the_last_ends() -> None:
    """Two decodes in one process (two ``run`` calls gathered): BLAS stays on one thread until the last block ends,
    whichever ends first, then gets back what the first block found; scipy's own OpenBLAS copy is set too."""
    pytest.importorskip("scipy.linalg")  # a second OpenBLAS in the process
    before = blas_threads()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, list[int]] = {}

    def first() -> None:
        with ops.DecodeThreads():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with ops.DecodeThreads():
            second_in.set()
            first_out.wait(10)
            seen["after the first ended"] = blas_threads()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(before) >= 2 and seen["after the first ended"] == [1] * len(before)
    assert blas_threads() == before


@pytest.mark.parametrize("tokens", [1, 3])
def test_a_large_int8_matrix_at_decode_gives_the_same_result_on_two_threads_as_on_one(tokens: int) -> None:
    """Decode casts a large int8 matrix on two threads, half the rows each, with BLAS on one thread (given back after):
    for one token bit for bit the one-thread result, and always the float64 product within float32 rounding; the head
    (``linear``, tokens as rows) goes the same way."""
    rng = np.random.default_rng(7)
    weight = rng.integers(-127, 128, size=(ops.PARALLEL_MIN_WEIGHTS // 1024 + 37, 1024), dtype=np.int8)  # odd rows: halves differ
    scales = rng.uniform(0.001, 0.01, weight.shape[0]).astype(np.float32)
    x = rng.standard_normal((tokens, 1024)).astype(np.float32)
    results = {}
    threads_before = blas_threads()
    for threads in (1, 2):
        with ops.DecodeThreads(threads) as split:
            assert split.splitting == (threads == 2)
            results[threads] = (ops.linear_t(x.T, weight, scales, split=split), ops.linear(x, weight, scales, split=split))
            blas_inside = blas_threads()
        assert not split.splitting and split.helper_tiles.size_bytes == 0  # the helper and its tile end with the block
        assert blas_inside == (threads_before if threads == 1 else [1] * len(threads_before))  # two of ours: BLAS on one
    assert blas_threads() == threads_before  # given back
    if tokens == 1:  # a matrix-vector product sums each row in one order, whatever the threads
        assert np.array_equal(results[1][0], results[2][0]) and np.array_equal(results[1][1], results[2][1])
    expected = (x.astype(np.float64) @ weight.T.astype(np.float64)) * scales
    for result in (results[1][0].T, results[1][1], results[2][0].T, results[2][1]):  # BLAS's threads may split the sums
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-3)
    with pytest.raises(UsageError, match="decode threads must be 1 or 2"), ops.DecodeThreads(3):
        pass
