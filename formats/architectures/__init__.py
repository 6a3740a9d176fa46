"""The model families and their registry: which family a Hugging Face config or a manifest names.

Each family is described with ``family.py``'s parts: the manifest ``config`` fields with their types, bounds and
defaults; how to normalise a Hugging Face config into them; every tensor's name and shape as a function of the
config; which execution step (layer) each tensor belongs to. The converter, the runtime's config reading and the
synthetic-model writer all read these, so a name or a default is written once. The families, by shape:

- ``encoders.py``: BERT.
- ``llama.py``: Llama, the decoder the others are described against.
- ``decoders.py``: what the decoders beyond Llama share (fields, config reading, tensor shapes from a layout).
- ``llama_like.py``: Qwen2, Qwen3, Mistral, Granite, StableLM (Llama's block).
- ``own_layouts.py``: Phi-3, Gemma 2, OLMo 2, GPT-2 (blocks laid out their own way).

``Architecture.validate(config, manifest)`` checks a model's config against the
tensors its manifest holds before anything is allocated: the converter runs it
before a file is put in place, the runtime before it runs one. A mismatch is a
``ManifestSchemaError`` naming the field, its value and the tensor it contradicts.

Layer 0 is the embeddings, layers 1..N the blocks, layer N+1 the final norm and
head: reading the file front to back yields layers in forward-pass order. The
token-embedding table (``row_table``) follows them as a row-table layer (format
version 2), its scales in layer 0, so that a client fetches the rows an input
needs and the blocks before the rest of the table; in a version-1 file it is in layer 0.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ...errors import UnsupportedArchitectureError
from ..family import Architecture, DecoderLayout

__all__ = [
    "BERT",
    "GEMMA2",
    "GPT2",
    "GRANITE",
    "LLAMA",
    "MISTRAL",
    "OLMO2",
    "PHI3",
    "QWEN2",
    "QWEN3",
    "ROW_TABLE_LAYER_NAME",
    "STABLELM",
    "Architecture",
    "DecoderLayout",
    "architecture_named",
    "find_architecture",
    "layer_names",
]

# Each family's module, by the name a manifest's config.architecture gives it: imported when first asked for, so a
# run imports its own family's description and not the ten others (a cached run's cold start).
FAMILY_MODULES = {
    "bert": "encoders",
    "llama": "llama",
    "qwen2": "llama_like",
    "qwen3": "llama_like",
    "mistral": "llama_like",
    "phi3": "own_layouts",
    "gemma2": "own_layouts",
    "gpt2": "own_layouts",
    "olmo2": "own_layouts",
    "granite": "llama_like",
    "stablelm": "llama_like",
}


def _family(name: str) -> Architecture:
    module = importlib.import_module(f".{FAMILY_MODULES[name]}", __name__)
    return getattr(module, name.upper())


def _every_family() -> tuple[Architecture, ...]:
    """Every family, in the order conversion tries them."""
    return tuple(_family(name) for name in FAMILY_MODULES)


def __getattr__(attribute: str) -> Any:
    """``BERT``, ``LLAMA``, ... and ``ARCHITECTURES`` (``_every_family()``), on first use."""
    if attribute == "ARCHITECTURES":
        return _every_family()
    if attribute.lower() in FAMILY_MODULES:
        return _family(attribute.lower())
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def find_architecture(hf_config: Mapping[str, Any]) -> Architecture:
    """The architecture for a Hugging Face config, or a clear error listing the supported ones."""
    model_type = hf_config.get("model_type")
    families = _every_family()
    for arch in families:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in families for t in a.model_types)
    raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported; streamload converts: {supported}")


def architecture_named(name: str) -> Architecture | None:
    """The family a manifest's ``config.architecture`` names, or None."""
    return _family(name) if isinstance(name, str) and name in FAMILY_MODULES else None


def layer_names(block_count: int) -> list[str]:
    """Names of the execution steps, in order."""
    return ["embeddings", *(f"block.{i}" for i in range(block_count)), "head"]


ROW_TABLE_LAYER_NAME = "embeddings.rows"
"""The name of the row-table layer that holds an architecture's ``row_table``."""
