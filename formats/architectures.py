"""What the converter knows about each supported architecture.

For every architecture: how to normalise its Hugging Face config into the
manifest's ``config``, which execution step (layer) each tensor belongs to, and
which tensors the runtime will need (checked before anything is written).
Layer 0 is the embeddings, layers 1..N the blocks, layer N+1 the final norm and
head: reading the file front to back yields layers in forward-pass order.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import SourceError, UnsupportedArchitectureError


@dataclasses.dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # HF config "model_type" values handled
    normalize_config: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    canonical_name: Callable[[str], str | None]  # HF tensor name -> stored name, or None to drop
    layer_of: Callable[[str, int], int]  # stored name, block count -> layer index
    expected_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...]]]


def _require(config: Mapping[str, Any], key: str, kind: type = int) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
        raise SourceError(f"config.json: {key!r} is missing or invalid ({value!r}); it is needed to convert this model")
    return value


_BLOCK = re.compile(r"^(?:encoder\.layer|model\.layers)\.(\d+)\.")


def _block_layer(name: str, block_count: int, first_prefix: str) -> int:
    if name.startswith(first_prefix):
        return 0
    match = _BLOCK.match(name)
    if match:
        index = int(match.group(1))
        if index >= block_count:
            raise SourceError(f"tensor {name!r} belongs to block {index}, but the config has {block_count} blocks")
        return index + 1
    return block_count + 1


# ---------------------------------------------------------------- BERT


def _bert_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    if hidden % heads:
        raise SourceError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(f"BERT with position_embedding_type={hf['position_embedding_type']!r} is not supported (only 'absolute')")
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        raise UnsupportedArchitectureError(f"BERT hidden_act {act!r} is not supported")
    return {
        "architecture": "bert",
        "vocab_size": _require(hf, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": _require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "intermediate_size": _require(hf, "intermediate_size"),
        "max_position_embeddings": _require(hf, "max_position_embeddings"),
        "type_vocab_size": int(hf.get("type_vocab_size", 2)),
        "layer_norm_eps": float(hf.get("layer_norm_eps", 1e-12)),
        "hidden_act": act,
        "pad_token_id": int(hf.get("pad_token_id", 0) or 0),
        # sentence-transformers pipeline (modules.json, 1_Pooling/config.json), when present
        "pooling": extras.get("pooling", "mean"),
        "normalize": bool(extras.get("normalize", False)),
        "max_seq_length": int(extras.get("max_seq_length", hf["max_position_embeddings"])),
    }


def _bert_name(name: str) -> str | None:
    name = name.removeprefix("bert.")
    if name.endswith(("position_ids", "token_type_ids")):
        return None  # integer buffers, derivable
    return name


def _bert_expected(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    h, f = config["hidden_size"], config["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (config["vocab_size"], h),
        "embeddings.position_embeddings.weight": (config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (config["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + part + ".weight"] = (h, h)
            shapes[p + part + ".bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (f, h)
        shapes[p + "intermediate.dense.bias"] = (f,)
        shapes[p + "output.dense.weight"] = (h, f)
        shapes[p + "output.dense.bias"] = (h,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"] = (h,)
            shapes[p + norm + ".bias"] = (h,)
    return shapes


BERT = Architecture(
    name="bert",
    model_types=("bert",),
    normalize_config=_bert_config,
    canonical_name=_bert_name,
    layer_of=lambda name, blocks: _block_layer(name, blocks, "embeddings."),
    expected_shapes=_bert_expected,
)

# ---------------------------------------------------------------- Llama


def _llama_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise SourceError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = int(hf.get("head_dim") or hidden // heads)
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta here
    rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UnsupportedArchitectureError(f"Llama rope scaling {rope_type!r} is not supported (default and llama3 are)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"Llama hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    eos = hf.get("eos_token_id")
    return {
        "architecture": "llama",
        "vocab_size": _require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _require(hf, "intermediate_size"),
        "num_hidden_layers": _require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": {k: v for k, v in (scaling or {}).items() if isinstance(v, (int, float, str))} if rope_type != "default" else None,
        "max_position_embeddings": int(hf.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "mlp_bias": bool(hf.get("mlp_bias", False)),
        "bos_token_id": hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        "eos_token_id": [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)],
    }


def _llama_name(name: str) -> str | None:
    return None if name.endswith("rotary_emb.inv_freq") else name


def _llama_expected(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    h, f, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if config["attention_bias"]:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (h,)}
    return shapes


LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    normalize_config=_llama_config,
    canonical_name=_llama_name,
    layer_of=lambda name, blocks: _block_layer(name, blocks, "model.embed_tokens."),
    expected_shapes=_llama_expected,
)

ARCHITECTURES = (BERT, LLAMA)


def find_architecture(hf_config: Mapping[str, Any]) -> Architecture:
    """The architecture for a Hugging Face config, or a clear error listing the supported ones."""
    model_type = hf_config.get("model_type")
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise UnsupportedArchitectureError(f"model_type {model_type!r} is not supported; streamload converts: {supported}")


def layer_names(block_count: int) -> list[str]:
    """Names of the execution steps, in order."""
    return ["embeddings", *(f"block.{i}" for i in range(block_count)), "head"]
