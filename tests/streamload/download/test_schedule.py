"""The scheduler alone: file order, queue jumping, cutting running spans, giving back, and a constant cost per chunk."""

from __future__ import annotations

import time

import pytest

from streamload.download.schedule import ChunkScheduler
from streamload.formats import ChunkEntry


def chunks_of(layout: list[int], size_bytes: int = 100) -> list[ChunkEntry]:
    """Chunks laid out contiguously; layout[i] = how many chunks layer i has."""
    result = []
    for layer, count in enumerate(layout):
        for _ in range(count):
            index = len(result)
            result.append(ChunkEntry(index, layer, index * size_bytes, size_bytes, index * 128, 128, bytes(32)))
    return result


def indices(span: object) -> list[int]:
    return [int(span.table.index[p]) for p in span.positions]  # type: ignore[attr-defined]


def test_spans_follow_file_order_and_skip_what_the_cache_has() -> None:
    scheduler = ChunkScheduler(chunks_of([2, 2, 2]), done_indices={2, 3})
    assert scheduler.pending_bytes == 400
    assert indices(scheduler.take_span(250)) == [0, 1]  # 1 is contiguous with 0; 2 and 3 are cached
    assert indices(scheduler.take_span(250)) == [4, 5]
    assert scheduler.take_span(250) is None and not scheduler.finished


def test_a_demanded_layer_jumps_the_queue_and_cuts_spans_that_will_not_reach_it() -> None:
    chunks = chunks_of([3, 3, 3])
    scheduler = ChunkScheduler(chunks)
    running = scheduler.take_span(300)
    assert indices(running) == [0, 1, 2] and not running.cut
    scheduler.prioritize(2)  # layer 2's chunks are pending: nobody is fetching them
    assert running.cut and scheduler.urgent_waiting()
    assert indices(scheduler.take_span(10_000)) == [6, 7, 8]  # the demand first, then file order resumes
    assert not scheduler.urgent_waiting()
    assert indices(scheduler.take_span(10_000)) == [3, 4, 5]


def test_a_demand_that_a_running_span_will_reach_cuts_nothing() -> None:
    scheduler = ChunkScheduler(chunks_of([2, 2, 2]))
    running = scheduler.take_span(10_000)
    scheduler.prioritize(2)
    assert not running.cut and not scheduler.urgent_waiting()


def test_a_whole_file_span_is_never_cut() -> None:
    scheduler = ChunkScheduler(chunks_of([2, 2]))
    whole = scheduler.take_all()
    assert indices(whole) == [0, 1, 2, 3] and not whole.cuttable
    scheduler.finish_span(whole)  # nothing received: all pending again
    whole = scheduler.take_all()
    whole.received = 1
    missed = scheduler.finish_span(whole)
    assert list(missed) == [1, 2, 3]  # positions (= indices here)
    scheduler.prioritize(1)
    whole = scheduler.take_all()
    scheduler.prioritize(0)
    assert not whole.cut


def test_a_span_gives_back_what_it_did_not_receive_and_a_demanded_chunk_returns_first() -> None:
    chunks = chunks_of([4, 4])
    scheduler = ChunkScheduler(chunks)
    span = scheduler.take_span(10_000)
    scheduler.prioritize(1)  # all of layer 1 is in the running span: no cut
    span.received = 6
    scheduler.done(span.positions[:6])
    assert list(scheduler.finish_span(span)) == [6, 7]
    assert scheduler.urgent_waiting()
    assert indices(scheduler.take_span(10_000)) == [6, 7]
    scheduler.done(range(6, len(chunks)))
    assert scheduler.finished


def test_a_chunk_that_failed_its_hash_is_fetched_again() -> None:
    chunks = chunks_of([3])
    scheduler = ChunkScheduler(chunks)
    span = scheduler.take_span(10_000)
    span.received = 3
    scheduler.done([0, 2])
    scheduler.give_back([1])  # failed verification
    scheduler.finish_span(span)
    assert indices(scheduler.take_span(10_000)) == [1]


def test_chunks_a_source_served_corrupt_are_left_to_others() -> None:
    chunks = chunks_of([4])
    scheduler = ChunkScheduler(chunks)
    span = scheduler.take_span(150)
    span.received = 1
    scheduler.give_back([0])  # chunk 0 failed its hash from this source
    scheduler.finish_span(span)
    avoid = frozenset({scheduler.position_of(chunks[0])})
    assert indices(scheduler.take_span(10_000, avoid=avoid)) == [1, 2, 3]  # its source goes on past it
    assert scheduler.take_span_at(0, 10_000, 0, 0, avoid=avoid) is None
    assert indices(scheduler.take_span(10_000)) == [0]  # another source takes it


@pytest.mark.parametrize("demand_every", [0, 7])
def test_the_cost_per_chunk_does_not_grow_with_the_chunk_count(demand_every: int) -> None:
    """20k chunks must cost about 10x 2k, not 100x: no operation may scan the pending chunks."""

    def drain(count: int) -> float:
        layers = [count // 100] * 100
        chunks = chunks_of(layers)
        scheduler = ChunkScheduler(chunks)
        started = time.perf_counter()
        taken = 0
        while (span := scheduler.take_span(100)) is not None:  # one chunk per span: the worst case
            if demand_every and taken % demand_every == 0:
                scheduler.prioritize((taken * 37) % len(layers))
            span.received = len(span.positions)
            scheduler.done(span.positions)
            scheduler.finish_span(span)
            taken += 1
        assert scheduler.finished and taken == count
        return time.perf_counter() - started

    drain(2_000)  # warm-up
    small = min(drain(2_000) for _ in range(5))
    large = min(drain(20_000) for _ in range(3))
    assert large / small < 30, f"{large / small:.1f}x the time for 10x the chunks"


def test_a_refinement_is_handed_out_only_after_the_coarse_chunks_under_it() -> None:
    chunks = chunks_of([2, 2, 2])  # 0-1 layer 0, 2-3 layer 1 (its refinements, pass 1, folded into 0-1), 4-5 layer 2
    chunks[2:4] = [ChunkEntry(c.index, 0, c.offset, c.size_bytes, c.raw_offset - 256, 128, c.sha256, 1) for c in chunks[2:4]]
    scheduler = ChunkScheduler(chunks, requires={2: [0], 3: [1]})
    first = scheduler.take_span(1000)
    assert indices(first) == [0, 1]  # the span stops before refinements whose coarse chunks are on the way
    first.received = 1
    scheduler.done(first.positions[:1])
    assert indices(scheduler.take_span(1000)) == [2]  # 0 is stored: its refinement may go; 3 waits for 1
    scheduler.done(first.positions[1:])
    assert indices(scheduler.take_span(1000)) == [3, 4, 5]
    scheduler = ChunkScheduler(chunks, requires={2: [0], 3: [1]})
    scheduler.prioritize(0, coarse=True)  # a preview awaits layer 0's coarse chunks only
    assert indices(scheduler.take_span(1000)) == [0, 1]
    scheduler.prioritize(0)  # then its exact form: its refinements wait for their coarse chunks, other work goes on
    assert indices(scheduler.take_span(1000)) == [4, 5]


def test_runs_taken_whole_give_the_spans_of_the_chunk_by_chunk_walk() -> None:
    """The fast path for runs of pending chunks (slices of the state, prefix sums) hands out exactly what the walk
    over single chunks does: random sizes, holes in the file, cached chunks, demands, rows and chunks to avoid."""
    import random

    rng = random.Random(3)
    for trial in range(60):
        chunks, offset = [], 0
        for index in range(rng.randrange(1, 120)):
            offset += rng.choice([0, 0, 0, 0, 10, 5000])  # a hole now and then, some beyond the gap
            size = rng.randrange(1, 300)
            chunks.append(ChunkEntry(index, index // 10, offset, size, index * 512, 512, bytes(32)))
            offset += size
        done = {c.index for c in chunks if rng.random() < 0.2}
        rows_from = rng.choice([None, len(chunks) // 2])
        fast, slow = (ChunkScheduler(chunks, done, rows_from=rows_from) for _ in range(2))
        slow._run_end = lambda position, limit, room_bytes: position  # type: ignore[method-assign]
        for _ in range(40):
            action = rng.random()
            if action < 0.15:
                positions = sorted(rng.sample(range(len(chunks)), min(len(chunks), 3)))
                cut = rng.random() < 0.5
                for scheduler in (fast, slow):
                    scheduler.demand(positions, cut=cut)
                continue
            avoid = frozenset(rng.sample(range(len(chunks)), 2)) if action < 0.25 and len(chunks) > 2 else frozenset()
            max_bytes, max_gap = rng.choice([50, 400, 3000, 1 << 30]), rng.choice([0, 64, 10_000])
            spans = [s.take_span(max_bytes, max_gap, avoid) for s in (fast, slow)]
            assert [None if s is None else indices(s) for s in spans[:1]] == [None if s is None else indices(s) for s in spans[1:]], trial
            counters = [(s.pending_bytes, s._pending, s._taken, s._urgent_pending, bytes(s._state)) for s in (fast, slow)]
            assert counters[0] == counters[1], trial
            if spans[0] is not None:
                received = rng.randrange(len(spans[0].positions) + 1)
                for span, scheduler in zip(spans, (fast, slow), strict=True):
                    span.received = received
                    scheduler.done(span.positions[:received])
                    scheduler.finish_span(span)
