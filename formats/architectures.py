"""The model families themselves, BERT and Llama, each built from ``family.py``'s parts: fields, tensors, layers.

For every family: the manifest ``config`` fields with their types, bounds and
defaults; how to normalise a Hugging Face config into them; every tensor's name
and shape as a function of the config; which execution step (layer) each
tensor belongs to. The converter, the runtime's config reading and the
synthetic-model writer all read these, so a name or a default is written once.

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

from ..errors import ManifestSchemaError, SourceError, UnsupportedArchitectureError
from .constants import MAX_STORE_SIZE_BYTES
from .family import (
    COUNT,
    EPS,
    MAX_POSITIONS,
    POSITIONS,
    Architecture,
    Dim,
    Field,
    choice,
    fail,
    flag,
    id_list,
    integer,
    optional_id,
    real,
    require,
)

__all__ = ["BERT", "LLAMA", "ROW_TABLE_LAYER_NAME", "Architecture", "architecture_named", "find_architecture", "layer_names"]


# ---------------------------------------------------------------- BERT

_BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_BERT_POOLING = ("mean", "cls", "max")  # sentence-transformers' pooling modes


def _bert_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    if hidden % heads:
        raise SourceError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedArchitectureError(
            f"BERT with position_embedding_type={hf['position_embedding_type']!r} is not supported (only 'absolute')"
        )
    act = hf.get("hidden_act", BERT.default("hidden_act"))
    if act not in _BERT_ACTIVATIONS:
        raise UnsupportedArchitectureError(f"BERT hidden_act {act!r} is not supported")
    return {
        "architecture": "bert",
        "vocab_size": require(hf, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "intermediate_size": require(hf, "intermediate_size"),
        "max_position_embeddings": require(hf, "max_position_embeddings"),
        "type_vocab_size": int(hf.get("type_vocab_size", BERT.default("type_vocab_size"))),
        "layer_norm_eps": float(hf.get("layer_norm_eps", BERT.default("layer_norm_eps"))),
        "hidden_act": act,
        "pad_token_id": int(hf.get("pad_token_id", BERT.default("pad_token_id")) or 0),
        # sentence-transformers pipeline (modules.json, 1_Pooling/config.json), when present
        "pooling": extras.get("pooling", BERT.default("pooling")),
        "normalize": bool(extras.get("normalize", BERT.default("normalize"))),
        "max_seq_length": int(extras.get("max_seq_length", hf["max_position_embeddings"])),
    }


def _bert_name(name: str) -> str | None:
    name = name.removeprefix("bert.")
    if name.endswith(("position_ids", "token_type_ids")):
        return None  # integer buffers, derivable
    return name


def _bert_dims(config: Mapping[str, Any]) -> dict[str, tuple[tuple[Dim, ...], bool]]:
    h, f = ("hidden_size",), ("intermediate_size",)
    dims: dict[str, tuple[Dim, ...]] = {
        "embeddings.word_embeddings.weight": (("vocab_size",), h),
        "embeddings.position_embeddings.weight": (("max_position_embeddings",), h),
        "embeddings.token_type_embeddings.weight": (("type_vocab_size",), h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            dims[p + part + ".weight"] = (h, h)
            dims[p + part + ".bias"] = (h,)
        dims[p + "intermediate.dense.weight"] = (f, h)
        dims[p + "intermediate.dense.bias"] = (f,)
        dims[p + "output.dense.weight"] = (h, f)
        dims[p + "output.dense.bias"] = (h,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            dims[p + norm + ".weight"] = (h,)
            dims[p + norm + ".bias"] = (h,)
    return {name: (shape, True) for name, shape in dims.items()}


def _bert_check(values: dict[str, Any]) -> None:
    if values["max_seq_length"] is None:
        values["max_seq_length"] = values["max_position_embeddings"]
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if hidden % heads:
        raise ManifestSchemaError(f"model config: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    if values["pad_token_id"] >= values["vocab_size"]:
        raise ManifestSchemaError(f"model config: pad_token_id={values['pad_token_id']} is outside vocab_size={values['vocab_size']}")


BERT = Architecture(
    name="bert",
    model_types=("bert",),
    fields=(
        Field("vocab_size", COUNT),
        Field("hidden_size", COUNT),
        Field("num_hidden_layers", COUNT),
        Field("num_attention_heads", COUNT),
        Field("intermediate_size", COUNT),
        Field("max_position_embeddings", POSITIONS),
        Field("type_vocab_size", COUNT, 2),
        Field("layer_norm_eps", EPS, 1e-12),
        Field("hidden_act", choice(*_BERT_ACTIVATIONS), "gelu"),
        Field("pad_token_id", integer(0, MAX_STORE_SIZE_BYTES), 0),
        Field("pooling", choice(*_BERT_POOLING), "mean"),
        Field("normalize", flag, False),
        Field(
            "max_seq_length", lambda name, value: None if value is None else POSITIONS(name, value), None
        ),  # None: max_position_embeddings
    ),
    normalize_config=_bert_config,
    canonical_name=_bert_name,
    first_prefix="embeddings.",
    row_table="embeddings.word_embeddings.weight",
    tensor_dims=_bert_dims,
    check_config=_bert_check,
)

# ---------------------------------------------------------------- Llama


def _llama_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise SourceError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = int(hf.get("head_dim") or hidden // heads)
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta here
    rope_theta = float(hf.get("rope_theta") or rope.get("rope_theta") or LLAMA.default("rope_theta"))
    scaling = hf.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise UnsupportedArchitectureError(f"Llama rope scaling {rope_type!r} is not supported (default and llama3 are)")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"Llama hidden_act {hf.get('hidden_act')!r} is not supported (only silu)")
    eos = hf.get("eos_token_id")
    return {
        "architecture": "llama",
        "vocab_size": require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": require(hf, "intermediate_size"),
        "num_hidden_layers": require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(hf.get("rms_norm_eps", LLAMA.default("rms_norm_eps"))),
        "rope_theta": rope_theta,
        "rope_scaling": {k: v for k, v in (scaling or {}).items() if isinstance(v, (int, float, str))} if rope_type != "default" else None,
        "max_position_embeddings": int(hf.get("max_position_embeddings", LLAMA.default("max_position_embeddings"))),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", LLAMA.default("tie_word_embeddings"))),
        "attention_bias": bool(hf.get("attention_bias", LLAMA.default("attention_bias"))),
        "mlp_bias": bool(hf.get("mlp_bias", LLAMA.default("mlp_bias"))),
        "bos_token_id": hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        "eos_token_id": [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)],
    }


def _llama_name(name: str) -> str | None:
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


def _rope_scaling(name: str, value: Any) -> Mapping[str, Any] | None:
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


def _llama_check(values: dict[str, Any]) -> None:
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if heads % kv_heads:
        raise ManifestSchemaError(f"model config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if values["head_dim"] % 2:
        raise ManifestSchemaError(f"model config: head_dim={values['head_dim']} must be even (rotary embeddings rotate pairs)")


def _eos_ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return id_list(name, [value] if isinstance(value, int) and not isinstance(value, bool) else value)


LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    fields=(
        Field("vocab_size", COUNT),
        Field("hidden_size", COUNT),
        Field("intermediate_size", COUNT),
        Field("num_hidden_layers", COUNT),
        Field("num_attention_heads", COUNT),
        Field("num_key_value_heads", COUNT),
        Field("head_dim", COUNT),
        Field("rms_norm_eps", EPS, 1e-6),
        Field("rope_theta", real(1e-6, 1e300), 10000.0),
        Field("rope_scaling", _rope_scaling, None),
        Field("max_position_embeddings", POSITIONS, 2048),
        Field("tie_word_embeddings", flag, False),
        Field("attention_bias", flag, False),
        Field("mlp_bias", flag, False),
        Field("bos_token_id", optional_id, None),
        Field("eos_token_id", _eos_ids, []),
    ),
    normalize_config=_llama_config,
    canonical_name=_llama_name,
    first_prefix="model.embed_tokens.",
    row_table="model.embed_tokens.weight",
    tensor_dims=_llama_dims,
    check_config=_llama_check,
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


def architecture_named(name: str) -> Architecture | None:
    """The family a manifest's ``config.architecture`` names, or None."""
    return next((arch for arch in ARCHITECTURES if arch.name == name), None)


def layer_names(block_count: int) -> list[str]:
    """Names of the execution steps, in order."""
    return ["embeddings", *(f"block.{i}" for i in range(block_count)), "head"]


ROW_TABLE_LAYER_NAME = "embeddings.rows"
"""The name of the row-table layer that holds an architecture's ``row_table``."""
