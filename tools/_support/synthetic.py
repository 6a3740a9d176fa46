"""Random Hugging Face-style model folders, for tests and benchmarks (never committed, always regenerated).

A folder holds config.json and model.safetensors exactly as transformers
saves them, so the converter sees what it sees for a real model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from streamload.formats.architectures import LLAMA, Architecture
from streamload.formats.constants import DEFAULT_CHUNK_SIZE_BYTES, QuantScheme
from streamload.formats.writer import ModelWriter


def llama_config(
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 176,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 256,
) -> dict[str, Any]:
    """A LlamaForCausalLM config.json (grouped-query attention by default)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def llama_tensor_shapes(config: dict[str, Any], family: Architecture = LLAMA) -> dict[str, tuple[int, ...]]:
    """HF LlamaForCausalLM tensor names and shapes for a config.json (the family description's, in transformers' order);
    ``family``: another decoder described with the same config fields (Qwen2, Mistral...)."""
    return family.expected_shapes(family.normalize_config(config, {}))


def write_synthetic_llama(
    folder: str | os.PathLike[str], config: dict[str, Any], *, seed: int = 0, dtype: str = "float32", family: Architecture = LLAMA
) -> Path:
    """Write config.json and model.safetensors with N(0, 0.02) weights and near-1 norms; returns the folder."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in llama_tensor_shapes(config, family).items():
        if len(shape) == 1:
            values = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        else:
            values = 0.02 * rng.standard_normal(shape, dtype=np.float32)
        tensors[name] = values.astype(dtype)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_synthetic_int8_model(
    path: str | os.PathLike[str], *, blocks: int, block_raw_bytes: int, seed: int = 0, chunk_size_bytes: int | None = None
) -> Path:
    """A .slm of ``blocks`` layers of int8 matrices that compress like real quantized weights.

    Values are rounded Gaussians (std 24, clipped to +-127): order-0 entropy ~7.3 bits, like
    all-MiniLM-L6-v2's int8 weights, so compression ratio and decode speed are realistic.
    Written straight with ModelWriter: a 1 GB model takes seconds, not a conversion of 4 GB of fp32.
    """

    rng = np.random.default_rng(seed)
    cols = 2048
    rows = max(1, block_raw_bytes // cols)
    config = {"architecture": "synthetic", "num_hidden_layers": blocks, "hidden_size": cols}
    with ModelWriter(path, config=config, chunk_size_bytes=chunk_size_bytes or DEFAULT_CHUNK_SIZE_BYTES) as writer:
        for index in range(blocks):
            writer.begin_layer(f"block.{index}")
            q = np.clip(np.rint(rng.standard_normal((rows, cols), dtype=np.float32) * 24), -127, 127).astype(np.int8)
            writer.add_tensor(f"block.{index}.weight", q, quant=QuantScheme.INT8_ROW, scales=f"block.{index}.scales")
            writer.add_tensor(f"block.{index}.scales", np.full(rows, 0.01, np.float32))
            writer.end_layer()
        writer.finish()
    return Path(path)


def large_manifest(chunk_count: int) -> tuple[bytes, int]:
    """A legal manifest of ``chunk_count`` 1 MiB chunks in layers of 1000, and its data region's size."""
    raw_size, per_layer = 1 << 20, 1000
    layers, tensors, chunks, offset = [], [], [], 0
    for layer in range(chunk_count // per_layer):
        start = layer * per_layer * raw_size
        layers.append({"name": f"block.{layer}", "raw_offset": start, "raw_size": per_layer * raw_size})
        tensors.append(
            {
                "name": f"block.{layer}.weight",
                "layer": layer,
                "dtype": "f32",
                "shape": [per_layer * raw_size // 4],
                "raw_offset": start,
                "quant": "none",
            }
        )
        for c in range(per_layer):
            size = 300_000 + c
            sha = hashlib.sha256(offset.to_bytes(8, "little")).digest()
            chunks.append(
                {"layer": layer, "offset": offset, "size": size, "raw_offset": start + c * raw_size, "raw_size": raw_size, "sha256": sha}
            )
            offset += size
    root = {
        "config": {"architecture": "synthetic"},
        "chunk_size": raw_size,
        "layers": layers,
        "tensors": tensors,
        "chunks": chunks,
        "tokenizer": None,
        "stats": {},
    }
    return msgpack.packb(root, use_bin_type=True), offset
