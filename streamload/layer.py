"""A layer's tensors as read-only numpy views of the memory-mapped store (the runtime's input type)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from .formats import Manifest, QuantScheme, TensorEntry, view_tensor
from .formats.quantize import coarse_levels


@dataclasses.dataclass(frozen=True, slots=True)
class Layer:
    """One layer's tensors: read-only numpy views of the memory-mapped store."""

    index: int
    name: str
    tensors: Mapping[str, np.ndarray]
    quant: Mapping[str, str]  # tensor name -> scales tensor name, for int8_row tensors
    borrowed: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)  # scales that live in another layer (a row table's)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def weight(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, per-row scales) for an int8 tensor, (values, None) for a float one."""
        scales = self.quant.get(name)
        if scales is None:
            return self.tensors[name], None
        return self.tensors[name], self.tensors[scales] if scales in self.tensors else self.borrowed[scales]


def distinct_rows(ids: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``ids``: ``np.unique`` without the numpy.ma import it makes (a cold start's cost:
    ``python -X importtime -c 'import numpy, numpy.ma'``)."""
    ordered = np.sort(np.asarray(ids), axis=None)
    if ordered.size < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def map_layer(manifest: Manifest, store: object, index: int, *, coarse: bool = False, base_offset: int = 0) -> Layer:
    """Layer ``index`` as zero-copy read-only views of ``store`` (a buffer laid out as FORMAT.md's layer store, or the part
    of it from ``base_offset`` on).

    A row table's scales, which live in an execution step, are included: that layer must be here too.
    ``coarse``: progressive tensors as copies at their coarse levels (whether or not refinements were folded
    into the store yet), the rest as views.
    """
    entries = manifest.tensors_of_layer(index)
    scales = (manifest.tensor_by_name.get(t.scales or "") for t in entries if t.quant is QuantScheme.INT8_ROW)
    foreign = [t for t in scales if t is not None and t.layer_index != index]  # a row table's, from an execution step

    def view(entry: TensorEntry) -> np.ndarray:
        array = view_tensor(store if store is not None else bytearray(0), entry, base_offset)
        if coarse and entry.coarse_shift is not None:
            array = coarse_levels(array, entry.coarse_shift)
        array.flags.writeable = False
        return array

    quant = {t.name: t.scales for t in entries if t.quant is QuantScheme.INT8_ROW and t.scales}
    return Layer(
        index=index,
        name=manifest.layers[index].name,
        tensors={entry.name: view(entry) for entry in entries},
        quant=quant,
        borrowed={entry.name: view(entry) for entry in foreign},
    )
