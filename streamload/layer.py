"""A layer's tensors as read-only numpy views of the memory-mapped store (the runtime's input type)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .formats import Manifest, QuantScheme, view_tensor


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One layer's tensors: read-only numpy views of the memory-mapped store."""

    index: int
    name: str
    tensors: Mapping[str, np.ndarray]
    quant: Mapping[str, str]  # tensor name -> scales tensor name, for int8_row tensors

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, per-row scales) for an int8 tensor, (values, None) for a float one."""
        scales = self.quant.get(name)
        return self.tensors[name], None if scales is None else self.tensors[scales]


def map_layer(manifest: Manifest, store: object, index: int) -> Layer:
    """Layer ``index`` as zero-copy read-only views of ``store`` (a buffer laid out as FORMAT.md's layer store)."""
    entries = manifest.tensors_of_layer(index)
    tensors = {}
    for entry in entries:
        array = view_tensor(store if store is not None else bytearray(0), entry)
        array.flags.writeable = False
        tensors[entry.name] = array
    quant = {t.name: t.scales for t in entries if t.quant is QuantScheme.INT8_ROW and t.scales}
    return Layer(index=index, name=manifest.layers[index].name, tensors=tensors, quant=quant)
