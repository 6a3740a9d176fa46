"""A converted file's tensors as float32, to compare with the source it was converted from."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from streamload.formats import ModelReader
from streamload.formats.constants import QuantScheme
from streamload.formats.reader import dequantize


def read_dequantized(reader: ModelReader) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 values) for every tensor but scales, layer by layer."""
    manifest = reader.manifest
    scale_names = {t.scales for t in manifest.tensors if t.scales}
    scales_seen: dict[str, np.ndarray] = {}  # a row table's scales live in an earlier layer
    for layer in manifest.layers:
        tensors = reader.read_tensors(layer.index)
        for entry in manifest.tensors_of_layer(layer.index):
            if entry.name in scale_names:
                scales_seen[entry.name] = tensors[entry.name]
        for entry in manifest.tensors_of_layer(layer.index):
            if entry.name in scale_names:
                continue
            values = tensors[entry.name]
            if entry.quant is QuantScheme.INT8_ROW:
                values = dequantize(values, scales_seen[entry.scales or ""])
            yield entry.name, values.astype(np.float32, copy=False)
