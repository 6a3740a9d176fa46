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

from collections.abc import Mapping
from typing import Any

from ...errors import UnsupportedArchitectureError
from ..family import Architecture, DecoderLayout
from .encoders import BERT
from .llama import LLAMA
from .llama_like import GRANITE, MISTRAL, QWEN2, QWEN3, STABLELM
from .own_layouts import GEMMA2, GPT2, OLMO2, PHI3

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

ARCHITECTURES = (BERT, LLAMA, QWEN2, QWEN3, MISTRAL, PHI3, GEMMA2, GPT2, OLMO2, GRANITE, STABLELM)


def find_architecture(hf_config: Mapping[str, Any]) -> Architecture:
    """The architecture for a Hugging Face config, or a clear error listing the supported ones."""
    model_type = hf_config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported; streamload converts: {supported}")


def architecture_named(name: str) -> Architecture | None:
    """The family a manifest's ``config.architecture`` names, or None."""
    return next((arch for arch in ARCHITECTURES if arch.name == name), None)


def layer_names(block_count: int) -> list[str]:
    """Names of the execution steps, in order."""
    return ["embeddings", *(f"block.{i}" for i in range(block_count)), "head"]


ROW_TABLE_LAYER_NAME = "embeddings.rows"
"""The name of the row-table layer that holds an architecture's ``row_table``."""
