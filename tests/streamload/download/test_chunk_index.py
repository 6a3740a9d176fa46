"""What a session computes once about a model's chunk table (``ChunkIndex``) and what its cache holds (``CachedChunks``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamload.download.cached_chunks import CachedChunks
from streamload.download.chunk_index import ChunkIndex
from streamload.formats import ModelReader

TABLE = "embeddings.word_embeddings.weight"


def read_index(path: Path) -> ChunkIndex:
    with ModelReader(path) as reader:
        return ChunkIndex.build(reader.manifest)


def test_every_chunk_has_one_place_in_the_index(minilm_progressive_slm: Path) -> None:
    index = read_index(minilm_progressive_slm)
    table = index.table
    assert (index.position_of[table.index] == np.arange(len(table))).all()
    for layer_index, positions in enumerate(index.layer_positions):
        assert (table.layer[positions] == layer_index).all() and (table.pass_index[positions] == 0).all()
        assert (np.diff(table.raw_offset[positions]) > 0).all()  # ascending in the store: rows are found by bisection
        assert (index.chunk_starts[layer_index] == table.raw_offset[positions]).all()
    base, refinements = np.concatenate(index.layer_positions), np.concatenate(index.plan.layer_refinements)
    assert len(refinements) and sorted(np.concatenate([base, refinements]).tolist()) == list(range(len(table)))
    assert index.rows_from == len(table) or table.pass_index[index.rows_from] == 0


def test_the_chunks_of_rows_cover_those_rows_and_no_other_chunk(minilm_slm: Path) -> None:
    with ModelReader(minilm_slm) as reader:
        manifest = reader.manifest
    index = ChunkIndex.build(manifest)
    entry = manifest.tensor(TABLE)
    row_bytes = entry.shape[1] * entry.dtype.size_bytes
    ids = np.array([0, 1, 5000, entry.shape[0] - 1], np.int64)
    positions = index.positions_of_rows(entry.layer_index, entry.raw_offset, row_bytes, ids)
    starts, ends = index.table.raw_offset[positions], index.table.raw_offset[positions] + index.table.raw_size[positions]
    rows = [(entry.raw_offset + i * row_bytes, entry.raw_offset + (i + 1) * row_bytes) for i in ids.tolist()]
    for row_start, row_end in rows:  # each row's bytes lie in the chunks found, back to back
        covering = (starts < row_end) & (ends > row_start)
        assert starts[covering].min() <= row_start and ends[covering].max() >= row_end
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):  # and each chunk found holds one of them
        assert any(start < row_end and end > row_start for row_start, row_end in rows)


def test_a_store_cut_short_loses_the_journaled_chunks_past_its_end(minilm_slm: Path) -> None:
    index = read_index(minilm_slm)
    table = index.table
    full_size = int((table.raw_offset + table.raw_size).max())
    store_size = full_size // 2
    journaled = {int(i): 7 for i in table.index.tolist()} | {10**9: 7}  # and an index the model does not have
    cached = CachedChunks(None, index, journaled, store_size, full_size)  # type: ignore[arg-type]  # the cache: for checks only
    assert cached.store_cut_short
    within = table.raw_offset + table.raw_size <= store_size
    assert sorted(cached.journaled) == sorted(table.index[within].tolist())
    assert (cached.pending() == ~within).all()
    whole = CachedChunks(None, index, journaled, full_size, full_size)  # type: ignore[arg-type]
    assert not whole.store_cut_short and not whole.pending().any()
