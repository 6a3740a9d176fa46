"""A run under a memory budget: where the budget comes from, what the plan keeps resident, and that a budget changes
where the weights come from, never the result (runtime.memory, runtime.residency)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import streamload
from streamload.errors import MemoryBudgetError, UsageError
from streamload.runtime import run
from streamload.runtime.memory import (
    MARGIN_BYTES,
    MemoryBudget,
    Segment,
    parse_size_bytes,
    plan_residency,
    read_cgroup_memory_limit,
    resolve_memory_budget,
)
from tests.support.paths import FIXTURES
from tests.support.serving import ServerThread

STREAMLOAD = str(Path(sys.executable).parent / "streamload")
PROMPT = [1, 2, 3, 4, 5]
PLAN_LINE = re.compile(r"(\d+) of (\d+) weight segments resident")


@pytest.mark.parametrize(
    ("text", "size"), [("640M", 640 << 20), ("1.5G", 3 << 29), ("320MiB", 320 << 20), ("4096", 4096), ("2k", 2048), ("1 t", 1 << 40)]
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size_bytes(text) == size


@pytest.mark.parametrize("text", ["", "M", "12 apples", "-5M", "1e9"])
def test_a_size_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size_bytes(text)


def test_cgroup_v1_limit_is_the_smallest_along_the_path(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("12:cpu,cpuacct:/x\n7:memory:/outer/inner\n0::/\n")
    memory = tmp_path / "fs" / "memory"
    (memory / "outer" / "inner").mkdir(parents=True)
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the root: no limit
    (memory / "outer" / "memory.limit_in_bytes").write_text(f"{640 << 20}\n")
    (memory / "outer" / "inner" / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    budget = read_cgroup_memory_limit(proc, tmp_path / "fs")
    assert budget is not None and budget.total_bytes == 640 << 20 and "cgroup v1" in budget.source


def test_cgroup_v2_limit_and_no_limit(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/user.slice/app\n")
    app = tmp_path / "fs" / "user.slice" / "app"
    app.mkdir(parents=True)
    (app / "memory.max").write_text("max\n")
    assert read_cgroup_memory_limit(proc, tmp_path / "fs") is None
    (app / "memory.max").write_text(f"{320 << 20}\n")
    budget = read_cgroup_memory_limit(proc, tmp_path / "fs")
    assert budget is not None and budget.total_bytes == 320 << 20 and "cgroup v2" in budget.source
    assert read_cgroup_memory_limit(tmp_path / "missing", tmp_path / "fs") is None


def test_a_budget_given_beats_the_environment_which_beats_the_cgroup() -> None:
    assert resolve_memory_budget(123 << 20, {"STREAMLOAD_MEMORY_BUDGET": "1G"}) == MemoryBudget(123 << 20, "argument")
    assert resolve_memory_budget(None, {"STREAMLOAD_MEMORY_BUDGET": "1G"}) == MemoryBudget(1 << 30, "STREAMLOAD_MEMORY_BUDGET")
    with pytest.raises(UsageError):
        resolve_memory_budget(0)


def segments(*sizes: int) -> list[Segment]:
    return [Segment(f"block {i}", i << 30, size, i) for i, size in enumerate(sizes)]


def test_a_plan_that_fits_keeps_everything_and_reads_nothing() -> None:
    plan = plan_residency(MemoryBudget(1 << 30, "argument"), segments(10 << 20, 10 << 20), fixed_costs={"process": 50 << 20})
    assert plan.all_resident and plan.streamed == () and plan.ring_bytes == 0


def test_a_tight_plan_keeps_the_first_segments_that_fit_and_stays_within_the_budget() -> None:
    sizes = [8 << 20] * 10
    budget = MemoryBudget((50 << 20) + MARGIN_BYTES + 2 * (8 << 20) + 4096 + (24 << 20), "argument")
    plan = plan_residency(budget, segments(*sizes), fixed_costs={"process": 50 << 20})
    assert sorted(plan.resident) == [0, 1, 2]  # 24 MiB of room: three 8 MiB segments, the first ones
    assert plan.streamed == tuple(range(3, 10)) and plan.streamed_bytes_per_step == 7 * (8 << 20)
    assert sum(plan.costs.values()) <= budget.total_bytes
    more = plan_residency(MemoryBudget(budget.total_bytes + (16 << 20), "argument"), segments(*sizes), fixed_costs={"process": 50 << 20})
    assert more.streamed_bytes_per_step < plan.streamed_bytes_per_step  # more memory, fewer bytes read per token


def test_a_budget_too_small_names_the_minimum() -> None:
    with pytest.raises(MemoryBudgetError, match=r"budget of 64\.0 MiB .* needs at least \d+\.\d MiB \(process 60\.0 MiB") as raised:
        plan_residency(MemoryBudget(64 << 20, "argument"), segments(8 << 20, 8 << 20, 8 << 20), fixed_costs={"process": 60 << 20})
    assert raised.value.minimum_bytes == (60 << 20) + MARGIN_BYTES + 2 * (8 << 20) + 4096  # the process, the margin, the ring


@pytest.fixture
def steady_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process's own memory counted as a constant: a test process grows between runs, and these budgets are tight."""
    from streamload.runtime import bert, generate

    for module in (bert, generate):
        monkeypatch.setattr(module, "process_anonymous_bytes", lambda: 64 << 20)


def test_the_process_s_own_memory_is_measured() -> None:
    from streamload.runtime.memory import process_anonymous_bytes

    assert 1 << 20 < process_anonymous_bytes() < 16 << 30


async def budget_runs(model: streamload.Model, caplog: pytest.LogCaptureFixture, extra_bytes: int) -> tuple[list[int], int, int]:
    """The minimum a budget must be for this model, then a run at that plus ``extra_bytes``: (ids, resident, segments)."""
    with pytest.raises(MemoryBudgetError) as raised:
        await run(model, ids=PROMPT, max_new_tokens=10, memory_budget_bytes=1)
    assert "needs at least" in str(raised.value)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="streamload.runtime.generate"):
        result = await run(model, ids=PROMPT, max_new_tokens=10, memory_budget_bytes=raised.value.minimum_bytes + extra_bytes)
    found = PLAN_LINE.search(caplog.text)
    assert found is not None and result.generated_ids is not None
    return result.generated_ids, int(found.group(1)), int(found.group(2))


async def test_decode_under_a_budget_streams_blocks_and_gives_the_same_tokens(
    server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture, steady_process: None
) -> None:
    async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        free = await run(model, ids=PROMPT, max_new_tokens=10, memory_budget_bytes=None, keep_prompt_logits=True)
        weights = sum(layer.raw_size_bytes for layer in model.manifest.layers[1:-1])
        ids, resident, total = await budget_runs(model, caplog, weights // 3)
        assert 0 < resident < total  # some blocks kept, the rest read from the store every token
        assert ids == free.generated_ids
        none_kept, resident, _ = await budget_runs(model, caplog, 0)
        assert resident == 0 and none_kept == free.generated_ids  # everything read every token: still the same tokens
        roomy = await run(model, ids=PROMPT, max_new_tokens=10, memory_budget_bytes=1 << 40)
        assert roomy.generated_ids == free.generated_ids


async def test_the_cast_tiles_are_the_run_s_and_the_plan_counts_the_decode_s(
    server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, steady_process: None
) -> None:
    """The buffers int8 tiles are cast into belong to the run's ``DecoderRunner``: the prefill's is freed before the plan
    is made, and the plan counts the decode's two (the loop's and its helper's) in its activations."""
    from streamload.runtime import generate, ops

    runners: list[generate.DecoderRunner] = []
    plans: list[tuple[int, int]] = []  # (the runner's tile bytes, the plan's activations) when the plan is made

    class Runner(generate.DecoderRunner):
        def __init__(self, *args: object) -> None:
            super().__init__(*args)  # type: ignore[arg-type]
            runners.append(self)

    def plan(budget: MemoryBudget, segments: list[Segment], *, fixed_costs: dict[str, int]) -> object:
        plans.append((runners[-1].tiles.size_bytes, fixed_costs["activations"]))
        return plan_residency(budget, segments, fixed_costs=fixed_costs)

    monkeypatch.setattr(generate, "DecoderRunner", Runner)
    monkeypatch.setattr(generate, "plan_residency", plan)
    async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
        await run(model, ids=PROMPT, max_new_tokens=4, memory_budget_bytes=1 << 40)
    assert len(runners) == 1 and runners[0].split is None  # the decode's threads ended with its loop
    assert plans[0][0] == 0 and plans[0][1] > ops.DECODE_CAST_TILE_BYTES


async def test_a_budget_does_not_change_what_sampling_draws(server: ServerThread, tmp_path: Path, steady_process: None) -> None:
    """Sampled tokens (temperature 1, a nucleus, a seed) follow every logit of every step, not only the largest."""
    sampling = {"ids": PROMPT, "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        free = await run(model, memory_budget_bytes=None, **sampling)
        with pytest.raises(MemoryBudgetError) as raised:
            await run(model, memory_budget_bytes=1, **sampling)
        tight = await run(model, memory_budget_bytes=raised.value.minimum_bytes, **sampling)
    assert tight.generated_ids == free.generated_ids


async def test_an_encoder_below_its_size_drops_each_layer_and_gives_the_same_embedding(
    server: ServerThread, tmp_path: Path, caplog: pytest.LogCaptureFixture, steady_process: None
) -> None:
    texts = ["a budget below the model's size", "the same embedding"]
    async with streamload.open(server.url("minilm.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        free = await run(model, texts=texts, memory_budget_bytes=None)  # a weight's first use: int8, no float32 copy yet
        with pytest.raises(MemoryBudgetError) as raised:
            await run(model, texts=texts, memory_budget_bytes=1)
        budget = raised.value.minimum_bytes + 1  # the largest layer fits; all of them do not
        with caplog.at_level(logging.INFO, logger="streamload.runtime.bert"):
            for _ in range(2):  # the second batch too: no float32 copies are made under this budget
                tight = await run(model, texts=texts, memory_budget_bytes=budget)
        assert "one layer at a time" in caplog.text
        assert model.runtime_state.float_weights.used_bytes == 0
    assert np.array_equal(tight.embedding, free.embedding)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STREAMLOAD, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_budget_too_small_is_one_line_naming_the_minimum(server: ServerThread, tmp_path: Path) -> None:
    base = ["run", server.url("deep.slm"), "--ids", "1,2,3", "--cache-dir", str(tmp_path)]
    for done in (cli(*base, "--memory-budget", "1k"), cli(*base, env={"STREAMLOAD_MEMORY_BUDGET": "1k"})):
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "needs at least" in lines[0] and "MiB" in lines[0] and "Traceback" not in done.stderr
    done = cli(*base, "--memory-budget", "lots")
    assert done.returncode == 2 and "not a size" in done.stderr
    done = cli(*base, env={"STREAMLOAD_MEMORY_BUDGET": "lots"})
    assert done.returncode != 0 and "STREAMLOAD_MEMORY_BUDGET" in done.stderr and "Traceback" not in done.stderr
    done = cli(*base, "--memory-budget", "none", "--json", "--max-new-tokens", "3")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("mirrored", [True, False])
def test_the_reader_hands_out_each_segment_s_bytes_cycle_after_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mirrored: bool
) -> None:
    """Segments of odd sizes at odd offsets, read through a ring smaller than two of them: every take is the file's bytes."""
    from streamload.runtime import residency

    if not mirrored:
        monkeypatch.setattr(residency, "_map_mirrored", lambda capacity: None)
    data = np.random.default_rng(3).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    store = tmp_path / "store.bin"
    store.write_bytes(data)
    spans = [(100, 700_001), (800_000, 3), (1 << 20, 900_000), (2_000_000, 1_000_000)]
    parts = tuple(Segment(f"s{i}", offset, size, i) for i, (offset, size) in enumerate(spans))
    ring = residency.Ring(1_000_000 + 5 * 4096 + 300_000)
    assert ring.mirrored == mirrored
    reader = residency.SegmentReader(store, parts, (0, 1, 2, 3), ring)
    try:
        for number in range(4 * 3):
            view, base = reader.take(number)
            part = parts[number % 4]
            start = part.offset - base
            assert bytes(view[start : start + part.size_bytes]) == data[part.offset : part.offset + part.size_bytes]
            reader.give_back(number)
    finally:
        reader.close()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "olmo2", "granite", "stablelm"])
async def test_every_decoder_family_streams_every_block_under_the_smallest_budget(
    family: str, tmp_path: Path, steady_process: None
) -> None:
    """Each family's blocks and head (tied or not, soft-capped, scaled) read from the store every token: the tokens are
    the unconstrained run's."""
    from streamload.formats import convert

    path = tmp_path / f"{family}.slm"
    convert(FIXTURES / f"{family}-tiny", path, chunk_size_bytes=16 << 10)
    prompt = [3, 17, 42, 7, 99, 5, 11, 250, 31, 64, 8, 2]  # past the fixtures' 8-token sliding windows
    async with streamload.open(path, cache_dir=tmp_path / "cache") as model:
        free = await run(model, ids=prompt, max_new_tokens=12, memory_budget_bytes=None)
        with pytest.raises(MemoryBudgetError) as raised:
            await run(model, ids=prompt, max_new_tokens=12, memory_budget_bytes=1)
        tight = await run(model, ids=prompt, max_new_tokens=12, memory_budget_bytes=raised.value.minimum_bytes)
    assert tight.generated_ids == free.generated_ids


def test_an_absurd_size_is_refused_not_a_traceback() -> None:
    with pytest.raises(UsageError, match="more than any machine"):
        parse_size_bytes("9" * 400)
    with pytest.raises(UsageError, match="more than any machine"):
        parse_size_bytes("99999999T")


def weight_readers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "streamload-weights"]


async def test_a_run_cancelled_while_its_plan_is_made_leaves_no_reader_ring_or_descriptor(
    server: ServerThread, tmp_path: Path, steady_process: None
) -> None:
    """Cancelled while the worker thread makes the plan (the moment the plan is logged), the weights it made are closed."""
    async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        with pytest.raises(MemoryBudgetError) as raised:
            await run(model, ids=PROMPT, max_new_tokens=8, memory_budget_bytes=1)
        budget = raised.value.minimum_bytes
        descriptors = len(os.listdir("/proc/self/fd"))
        loop = asyncio.get_running_loop()
        for _ in range(5):
            task = asyncio.ensure_future(run(model, ids=PROMPT, max_new_tokens=8, memory_budget_bytes=budget))

            class CancelAtThePlan(logging.Handler):
                def emit(self, record: logging.LogRecord, task: asyncio.Future = task) -> None:
                    if "weight segments resident" in record.getMessage():
                        loop.call_soon_threadsafe(task.cancel)

            handler = CancelAtThePlan()
            logging.getLogger("streamload.runtime.generate").addHandler(handler)
            logging.getLogger("streamload.runtime.generate").setLevel(logging.INFO)
            try:
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                logging.getLogger("streamload.runtime.generate").removeHandler(handler)
        # the plan's thread goes on after the cancellation and may start a reader after it: its weights are closed on
        # the loop once it is done, so wait until no reader has been seen for a second
        quiet = 0
        for _ in range(300):
            quiet = 0 if weight_readers() else quiet + 1
            if quiet == 10:
                break
            await asyncio.sleep(0.1)
    assert weight_readers() == []
    assert len(os.listdir("/proc/self/fd")) <= descriptors


async def test_a_cancelled_run_stops_decoding_after_the_token_in_hand(server: ServerThread, tmp_path: Path) -> None:
    """Ctrl-C or a consumer that leaves: decode stops at the next token, not after max_new_tokens."""
    seen: list[int] = []
    async with streamload.open(server.url("deep.slm"), cache_dir=tmp_path) as model:
        await model.wait_complete()
        loop = asyncio.get_running_loop()
        task: asyncio.Future = asyncio.Future()

        def on_token(token: int) -> None:
            seen.append(token)
            if len(seen) == 3:
                loop.call_soon_threadsafe(task.cancel)

        task = asyncio.ensure_future(run(model, ids=PROMPT, max_new_tokens=200, memory_budget_bytes=None, on_token=on_token))
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # what the decode thread does after the cancellation
    assert 3 <= len(seen) < 20, len(seen)
