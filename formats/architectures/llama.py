"""Llama, the decoder the others are described against: its config reading, tensors, layout, fields and checks.

Pure descriptions, built once at import: no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ConversionInputError, ManifestSchemaError, UnsupportedArchitectureError
from ..family import (
    EPS,
    MAX_POSITIONS,
    POSITIONS,
    Architecture,
    DecoderLayout,
    Dim,
    Field,
    counts,
    fail,
    flag,
    id_list,
    optional_id,
    real,
    require,
    token_ids,
)

__all__ = [
    "DECODER_SIZES",
    "LLAMA",
    "LLAMA_LAYOUT",
    "attention_heads",
    "check_heads",
    "decoder_sizes",
    "eos_ids",
    "llama_name",
    "rope_scaling",
]

DECODER_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
"""A decoder's size fields, in the manifest's order (``decoder_sizes`` writes them)."""


def attention_heads(hf: Mapping[str, Any]) -> tuple[int, int, int]:
    """(hidden_size, num_attention_heads, num_key_value_heads) of a Hugging Face config; no kv heads: one per head."""
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ConversionInputError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return hidden, heads, kv_heads


def decoder_sizes(hf: Mapping[str, Any], hidden: int, heads: int, kv_heads: int) -> dict[str, int]:
    """The ``DECODER_SIZES`` fields, given what ``attention_heads`` read."""
    return {
        "vocab_size": require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": require(hf, "intermediate_size"),
        "num_hidden_layers": require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(hf.get("head_dim") or hidden // heads),
    }


def _llama_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden, heads, kv_heads = attention_heads(hf)
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta here
    rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or LLAMA.default("rope_theta"))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UnsupportedArchitectureError(f"Llama rope scaling {rope_type!r} is not supported (default and llama3 are)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"Llama hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    return {
        "architecture": "llama",
        **decoder_sizes(hf, hidden, heads, kv_heads),
        "rms_norm_eps": float(hf.get("rms_norm_eps", LLAMA.default("rms_norm_eps"))),
        "rope_theta": rope_theta,
        "rope_scaling": {k: v for k, v in (scaling or {}).items() if isinstance(v, (int, float, str))} if rope_type != "default" else None,
        "max_position_embeddings": int(hf.get("max_position_embeddings", LLAMA.default("max_position_embeddings"))),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", LLAMA.default("tie_word_embeddings"))),
        "attention_bias": bool(hf.get("attention_bias", LLAMA.default("attention_bias"))),
        "mlp_bias": bool(hf.get("mlp_bias", LLAMA.default("mlp_bias"))),
        **token_ids(hf),
    }


def llama_name(name: str) -> str | None:
    """The stored name of a Llama-style source tensor; None for the rotary buffer (derivable)."""
    return None if name.endswith("rotary_emb.inv_freq") else name


def _llama_dims(config: Mapping[str, Any]) -> dict[str, tuple[tuple[Dim, ...], bool]]:
    """In the order transformers lists them (the synthetic writer draws weights in this order)."""
    h, f, v = ("hidden_size",), ("intermediate_size",), ("vocab_size",)
    q, kv = ("num_attention_heads", "head_dim"), ("num_key_value_heads", "head_dim")
    attention_bias, mlp_bias = config["attention_bias"], config["mlp_bias"]
    dims: dict[str, tuple[tuple[Dim, ...], bool]] = {"model.embed_tokens.weight": ((v, h), True)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        dims |= {
            p + "input_layernorm.weight": ((h,), True),
            p + "self_attn.q_proj.weight": ((q, h), True),
            p + "self_attn.k_proj.weight": ((kv, h), True),
            p + "self_attn.v_proj.weight": ((kv, h), True),
            p + "self_attn.o_proj.weight": ((h, q), True),
            p + "post_attention_layernorm.weight": ((h,), True),
            p + "mlp.gate_proj.weight": ((f, h), True),
            p + "mlp.up_proj.weight": ((f, h), True),
            p + "mlp.down_proj.weight": ((h, f), True),
            # biases: required when the config says so; the runtime adds any that are present
            p + "self_attn.q_proj.bias": ((q,), attention_bias),
            p + "self_attn.k_proj.bias": ((kv,), attention_bias),
            p + "self_attn.v_proj.bias": ((kv,), attention_bias),
            p + "self_attn.o_proj.bias": ((h,), attention_bias),
            p + "mlp.gate_proj.bias": ((f,), mlp_bias),
            p + "mlp.up_proj.bias": ((f,), mlp_bias),
            p + "mlp.down_proj.bias": ((h,), mlp_bias),
        }
    dims["model.norm.weight"] = ((h,), True)
    dims["lm_head.weight"] = ((v, h), not config["tie_word_embeddings"])  # tied: the head reads the embedding table
    return dims


def rope_scaling(name: str, value: Any) -> Mapping[str, Any] | None:
    """Llama's ``rope_scaling`` field: nil, or llama3 scaling with its factors checked."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise fail(name, value, "a map or nil")
    kind = value.get("rope_type", value.get("type"))
    if kind != "llama3":
        raise fail(name, value, "llama3 scaling (the only kind the runtime applies)")
    checked = {
        "factor": real(1e-6, 1e6)(name + ".factor", value.get("factor")),
        "low_freq_factor": real(1e-6, 1e6)(name + ".low_freq_factor", value.get("low_freq_factor", 1.0)),
        "high_freq_factor": real(1e-6, 1e6)(name + ".high_freq_factor", value.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": real(1, MAX_POSITIONS)(
            name + ".original_max_position_embeddings", value.get("original_max_position_embeddings", 8192)
        ),
    }
    if checked["high_freq_factor"] <= checked["low_freq_factor"]:
        raise fail(name, value, "high_freq_factor > low_freq_factor")
    return {"rope_type": "llama3", **checked}


def check_heads(values: dict[str, Any]) -> None:
    """Llama's relations: query heads a multiple of kv heads, an even head_dim."""
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if heads % kv_heads:
        raise ManifestSchemaError(f"model config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if values["head_dim"] % 2:
        raise ManifestSchemaError(f"model config: head_dim={values['head_dim']} must be even (rotary embeddings rotate pairs)")


def eos_ids(name: str, value: Any) -> tuple[int, ...]:
    """The ``eos_token_id`` field: nil, one id or a list of them."""
    if value is None:
        return ()
    return id_list(name, [value] if isinstance(value, int) and not isinstance(value, bool) else value)


LLAMA_LAYOUT = DecoderLayout(
    embed_tokens="model.embed_tokens.weight",
    block="model.layers.{i}.",
    attention_norm="input_layernorm",
    qkv=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    output="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    up=("mlp.gate_proj", "mlp.up_proj"),
    down="mlp.down_proj",
    final_norm="model.norm",
)

LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    fields=(
        *counts(*DECODER_SIZES),
        Field("rms_norm_eps", EPS, 1e-6),
        Field("rope_theta", real(1e-6, 1e300), 10000.0),
        Field("rope_scaling", rope_scaling, None),
        Field("max_position_embeddings", POSITIONS, 2048),
        Field("tie_word_embeddings", flag, False),
        Field("attention_bias", flag, False),
        Field("mlp_bias", flag, False),
        Field("bos_token_id", optional_id, None),
        Field("eos_token_id", eos_ids, []),
    ),
    normalize_config=_llama_config,
    canonical_name=llama_name,
    first_prefix="model.embed_tokens.",
    row_table="model.embed_tokens.weight",
    tensor_dims=_llama_dims,
    check_config=check_heads,
    decoder=LLAMA_LAYOUT,
)
