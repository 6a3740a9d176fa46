"""Row demand: the rows of the token table an input needs arrive first, the rest of the table follows in the background."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import streamload
from streamload.formats import ModelReader, convert
from streamload.layer import distinct_rows
from streamload.runtime import run
from tests.support.checks import assert_cache_exact, journal_count
from tests.support.faulty import Faults, faulty_app
from tests.support.serving import ServerThread, serve_directory
from tests.support.synthetic import llama_config, write_synthetic_llama

TABLE = "embeddings.word_embeddings.weight"
SENTENCE = "Streaming lets a phone start computing before the download ends."


def needed_bytes(path: Path, ids: list[int]) -> int:
    """Header + the embeddings and blocks (a sentence embedding does not use BERT's pooler head) + the chunks of the
    table that hold ``ids``, computed from the file alone."""
    with ModelReader(path) as reader:
        m = reader.manifest
        table = m.tensor(TABLE)
        row_bytes = table.shape[1]
        wanted = {table.raw_offset + i * row_bytes for i in ids}
        steps = sum(c.size_bytes for c in m.chunks if c.layer_index <= m.config["num_hidden_layers"])
        rows = sum(
            c.size_bytes
            for c in m.chunks_of_layer(table.layer_index)
            if any(c.raw_offset <= start < c.raw_offset + c.raw_size_bytes for start in wanted)
        )
        return reader.preamble.data_offset + steps + rows


@given(st.lists(st.integers(0, 30521), max_size=64), st.sampled_from([(-1,), (2, -1)]))
def test_distinct_rows_are_numpys_unique(ids: list[int], shape: tuple[int, ...]) -> None:
    array = np.asarray(ids, dtype=np.int64)
    if shape == (2, -1):  # a batch of two sentences: the ids of both, padded
        array = np.concatenate([array, array[::-1]]).reshape(2, -1)
    assert np.array_equal(distinct_rows(array), np.unique(array))


async def test_an_inputs_rows_arrive_before_the_rest_of_the_table(www: Path, tmp_path: Path) -> None:
    path = www / "minilm.slm"
    with ModelReader(path) as reader:
        table_layer = reader.manifest.tensor(TABLE).layer_index
        expected_table = reader.read_tensors(table_layer)[TABLE]
        expected_scales = reader.read_tensors(0)[TABLE + ".scales"]
    with serve_directory(www, rate_bytes_per_s=path.stat().st_size / 4.0) as server:  # ~4 s per connection for the file
        async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
            ids = model.tokenizer.encode(SENTENCE).ids
            values, scales = await model.rows(TABLE, ids)
            arrived = model.stats.bytes_downloaded
            assert model.layer_ready_s[table_layer] is None  # the rest of the table is still to come
            assert model.layer_ready_s[1] is None  # so are the blocks: the rows went first, beside the main request
            assert arrived < 0.2 * path.stat().st_size
            await model.wait_complete()
    np.testing.assert_array_equal(values, expected_table[ids])
    np.testing.assert_array_equal(scales, expected_scales[ids])
    assert_cache_exact(tmp_path, path)  # the background tail completed the cache


async def test_rows_of_a_cached_table_and_of_a_version_1_layout_read_the_same(www: Path, tmp_path: Path) -> None:
    path = www / "minilm.slm"
    ids = [101, 7592, 2088, 102, 30521, 0]
    async with streamload.open(path, cache_dir=tmp_path) as model:
        streamed = await model.rows(TABLE, ids)
        await model.wait_complete()
    async with streamload.open(path, cache_dir=tmp_path) as model:  # complete now: read from the store
        cached = await model.rows(TABLE, np.asarray(ids).reshape(2, 3))
        with pytest.raises(IndexError, match="row 30522 of 'embeddings.word_embeddings.weight' does not exist"):
            await model.rows(TABLE, [30522])
        with pytest.raises(KeyError, match="no 2-D tensor"):
            await model.rows("embeddings.LayerNorm.weight", [0])
    np.testing.assert_array_equal(cached[0].reshape(6, -1), streamed[0])
    assert cached[0].shape == (2, 3, 384) and cached[1] is not None and cached[1].shape == (2, 3)


async def test_the_result_depends_on_the_bytes_it_needed_and_arrives_before_the_table(www: Path, tmp_path: Path) -> None:
    """bytes_needed counts header, steps and the input's row chunks; the result is exact (the local file's)."""
    path = www / "minilm.slm"
    local = await _run_local(path, tmp_path / "local")
    with serve_directory(www, rate_bytes_per_s=path.stat().st_size / 4.0) as server:  # block 0 after ~0.4 s
        async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path / "streamed") as model:
            encoding = model.tokenizer.encode(SENTENCE)  # the embedded tokenizer pads: only the real tokens count
            ids = [i for i, real in zip(encoding.ids, encoding.attention_mask, strict=True) if real]
            result = await run(model, texts=[SENTENCE])
            table_ready = model.layer_ready_s[-1]
    np.testing.assert_array_equal(result.embedding, local)  # bit-identical: same bytes, same arithmetic
    assert result.bytes_needed == needed_bytes(path, ids) < 0.55 * path.stat().st_size
    assert table_ready is None  # the result came before the table was complete
    [fetch] = result.row_fetches
    assert fetch.rows == len(set(ids)) and fetch.ready_s < result.timeline[1].ready_s  # rows before block 0


async def _run_local(path: Path, cache: Path) -> np.ndarray:
    async with streamload.open(path, cache_dir=cache) as model:
        result = await run(model, texts=[SENTENCE])
    assert result.embedding is not None
    return result.embedding


async def test_a_decoders_generated_tokens_fetch_their_rows_on_demand(tmp_path: Path) -> None:
    """A large vocabulary (a 2 MB table behind 0.3 MB of blocks): every token is generated before the table is in."""
    source = write_synthetic_llama(
        tmp_path / "src", llama_config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=32000)
    )
    www = tmp_path / "www"
    www.mkdir()
    convert(source, www / "wide.slm")
    prompt = [1, 17, 300, 42]
    async with streamload.open(www / "wide.slm", cache_dir=tmp_path / "local") as model:
        local = await run(model, ids=prompt, max_new_tokens=12)
    with serve_directory(www, rate_bytes_per_s=(www / "wide.slm").stat().st_size / 3.0) as server:
        async with streamload.open(server.url("wide.slm"), cache_dir=tmp_path / "streamed") as model:
            streamed = await run(model, ids=prompt, max_new_tokens=12)
            table_ready = model.layer_ready_s[-1]
    assert streamed.generated_ids == local.generated_ids and len(set(streamed.generated_ids)) > 1
    assert table_ready is None  # every generated token's row came on demand, before the table was complete


def test_a_kill_during_the_row_fetch_resumes_exactly(www: Path, tmp_path: Path) -> None:
    """The rows' requests hang (the main request goes on); the process is killed; the next run completes exactly."""
    path = www / "minilm.slm"
    faults = Faults(script=["ok"] + ["stall:0"] * 8, rate_bytes_per_s=path.stat().st_size / 3.0)
    cache = tmp_path / "cache"
    with ServerThread(faulty_app(path, faults)) as server:
        command = [sys.executable, "-m", "streamload.cli", "run", server.url("minilm.slm"), "--text", SENTENCE, "--cache-dir", str(cache)]
        process = subprocess.Popen([*command, "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not ("stall:0" in faults.actions and journal_count(cache) > 0):
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert "stall:0" in faults.actions and journal_count(cache) > 0, "the kill must land while rows are requested"
        with ModelReader(path) as reader:
            assert journal_count(cache) < len(reader.manifest.chunks)
        faults.script.clear()  # the server behaves now
        faults.rate_bytes_per_s = None
        result = subprocess.run([*command, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["bytes_downloaded"] < path.stat().st_size  # resumed, not started over
    assert_cache_exact(cache, path)


def test_a_kill_during_the_background_tail_resumes_exactly(www: Path, tmp_path: Path) -> None:
    """``run`` prints the result, then completes the cache; killed then, the next ``fetch`` moves only what is missing."""
    path = www / "minilm.slm"
    cache = tmp_path / "cache"
    with serve_directory(www, rate_bytes_per_s=path.stat().st_size / 3.0) as server:
        url = server.url("minilm.slm")
        command = [sys.executable, "-m", "streamload.cli", "run", url, "--text", SENTENCE, "--cache-dir", str(cache), "--json"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())  # the result is out while the table is still arriving
        time.sleep(0.3)
        process.send_signal(signal.SIGKILL)
        process.wait()
        with ModelReader(path) as reader:
            total = len(reader.manifest.chunks)
        done = journal_count(cache)
        assert first["bytes_needed"] < first["file_bytes"] and 0 < done < total
        report = json.loads(
            subprocess.run(
                [sys.executable, "-m", "streamload.cli", "fetch", url, "--cache-dir", str(cache), "--json"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    assert report["chunks_cached"] == done and report["chunks_fetched"] == total - done
    assert_cache_exact(cache, path)
