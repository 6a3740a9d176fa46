"""A conversion's plan: the source read into its architecture, config and tensors, the tensors grouped by layer.

``read_source`` finds the source's files and its architecture, normalises its config and checks it against the
runtime's bounds; ``plan_layers`` checks every tensor the runtime needs is there with the right shape and groups the
source's tensors by execution step, int8-bound matrices first; ``take_row_table`` sets the token table apart (it is
written after every step). Reads only the source's headers; threads: the caller's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConversionInputError, FormatError
from .architectures import Architecture, find_architecture
from .model_source import ModelSource, find_source
from .safetensors_source import FLOAT_DTYPES, SafetensorsCollection

logger = logging.getLogger(__name__)

SourcePlan = list[list[tuple[str, str]]]
"""Per execution step, (source name, stored name) of its tensors: int8-bound matrices first, then by name."""


def read_source(
    source: str | os.PathLike[str], config_path: str | os.PathLike[str] | None, quant: str
) -> tuple[ModelSource, Architecture, dict[str, Any], SafetensorsCollection]:
    """The source's files, its architecture, its normalised config (checked against the runtime's bounds), its tensors."""
    model = find_source(source, config_path=config_path)
    arch = find_architecture(model.hf_config)
    config = arch.normalize_config(model.hf_config, model.extras)
    config["quantization"] = quant
    config.update({key: model.extras[key] for key in ("chat_template", "chat_special_tokens") if key in model.extras})
    try:
        arch.read_config(config)  # the runtime's bounds, before any work
    except FormatError as exc:
        raise ConversionInputError(f"config.json: {exc}") from None
    return model, arch, config, SafetensorsCollection(model.weights)


def plan_layers(arch: Architecture, config: Mapping[str, Any], tensors: SafetensorsCollection) -> SourcePlan:
    """Source tensor names grouped by layer, each group int8-bound matrices first, then by name."""
    blocks = config["num_hidden_layers"]
    plan: SourcePlan = [[] for _ in range(blocks + 2)]
    canonical: dict[str, str] = {}
    for source_name in tensors.names():
        name = arch.canonical_name(source_name)
        if name is None:
            continue
        if tensors.dtype_of(source_name) not in FLOAT_DTYPES:
            logger.info("skipping non-float tensor %s (%s)", source_name, tensors.dtype_of(source_name))
            continue
        canonical[name] = source_name
    expected = arch.expected_shapes(config)
    if arch.decoder is not None and arch.decoder.lm_head not in expected:
        canonical.pop(arch.decoder.lm_head, None)  # tied: the head reads the embedding table
    for name, shape in expected.items():
        if name not in canonical:
            raise ConversionInputError(f"tensor {name!r} is missing from the weights; the files do not match config.json")
        actual = tuple(tensors.shape_of(canonical[name]))[:: -1 if arch.source_transposed(name) else 1]
        if actual != shape:
            raise ConversionInputError(f"tensor {name!r} has shape {tuple(actual)}, config.json implies {shape}")
    for name in sorted(canonical):
        plan[arch.layer_of(name, blocks)].append((canonical[name], name))
    for group in plan:
        group.sort(key=lambda entry: (len(tensors.shape_of(entry[0])) != 2, entry[1]))
    return plan


def take_row_table(arch: Architecture, plan: SourcePlan) -> tuple[str, str]:
    """Remove the architecture's row table from layer 0's plan: (source name, stored name)."""
    for entry in plan[0]:
        if entry[1] == arch.row_table:
            plan[0].remove(entry)
            return entry
    raise ConversionInputError(f"tensor {arch.row_table!r} is missing from the weights")  # pragma: no cover - plan_layers checked it


@dataclasses.dataclass(frozen=True, slots=True)
class RowTable:
    """The token table: where it comes from, its stored name, and its scales when int8 (written in layer 0)."""

    source_name: str
    name: str
    scales: np.ndarray | None
