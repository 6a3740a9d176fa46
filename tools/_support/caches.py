"""A streamload cache checked against its file: every layer byte-exact, and how many chunks its journal names."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

import streamload
from streamload.cache import JOURNAL_NAME, JOURNAL_RECORD
from streamload.formats import ModelReader


def assert_layers_equal_file(layers: Mapping[int, streamload.Layer], path: Path) -> None:
    """Each given layer equals the file's own verified, decompressed layer, tensor by tensor."""
    with ModelReader(path) as reader:
        for index, layer in layers.items():
            expected = reader.read_tensors(index)
            assert layer.tensors.keys() == expected.keys()
            for name, values in expected.items():
                np.testing.assert_array_equal(layer[name], values)


def assert_cache_exact(cache: Path, path: Path) -> None:
    """The cache holds the whole model, byte-exact, with nothing left to fetch."""
    with streamload.load(path, cache_dir=cache) as model:
        assert model.stats.chunks_fetched == 0, "the cache should be complete"
        assert_layers_equal_file(dict(model.layers()), path)


def journal_count(cache: Path) -> int:
    """Chunks the (one) model's journal in ``cache`` names; 0 without a journal."""
    journals = list(cache.glob(f"models/*/{JOURNAL_NAME}"))
    return journals[0].stat().st_size // JOURNAL_RECORD.size if journals else 0
