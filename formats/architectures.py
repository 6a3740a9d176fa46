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

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ManifestSchemaError, SourceError, UnsupportedArchitectureError
from .constants import MAX_STORE_SIZE_BYTES
from .family import (
    COUNT,
    EPS,
    MAX_POSITIONS,
    POSITIONS,
    Architecture,
    DecoderLayout,
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
    decoder=LLAMA_LAYOUT,
)

# ---------------------------------------------------------------- decoders beyond Llama
#
# Each family below is a Hugging Face config normalisation plus a DecoderLayout; the tensor names and shapes come
# from the layout (``_decoder_dims``), the runtime reads the same layout (streamload/runtime/llama.py).

_ATTENTION_KINDS = ("full_attention", "sliding_attention")


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else COUNT(name, value)


def _optional_real(name: str, value: Any) -> float | None:
    return None if value is None else real(1e-6, 1e6)(name, value)


def _layer_types(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_POSITIONS:
        raise fail(name, value, "a list of " + " or ".join(_ATTENTION_KINDS))
    return tuple(choice(*_ATTENTION_KINDS)(name, kind) for kind in value)


def _factors(name: str, value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= 4096:
        raise fail(name, value, "a list of 1 to 4096 numbers")
    return tuple(real(1e-6, 1e6)(name, factor) for factor in value)


def _any_rope_scaling(name: str, value: Any) -> Mapping[str, Any] | None:
    """llama3 scaling (as Llama's field), or longrope: short and long factors per frequency (Phi-3)."""
    if isinstance(value, dict) and value.get("rope_type", value.get("type")) == "longrope":
        return {
            "rope_type": "longrope",
            "short_factor": _factors(name + ".short_factor", value.get("short_factor")),
            "long_factor": _factors(name + ".long_factor", value.get("long_factor")),
            "original_max_position_embeddings": POSITIONS(
                name + ".original_max_position_embeddings", value.get("original_max_position_embeddings")
            ),
            "attention_factor": real(1e-6, 1e6)(name + ".attention_factor", value.get("attention_factor", 1.0)),
        }
    return _rope_scaling(name, value)


def _rope_of(family: str, hf: Mapping[str, Any], kinds: tuple[str, ...]) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, the manifest's rope_scaling, partial_rotary_factor) from either config layout transformers writes."""
    rope = dict(hf.get("rope_parameters") or {})  # transformers >= 5 keeps rope_theta here
    theta = float(hf.get("rope_theta") or rope.get("rope_theta") or LLAMA.default("rope_theta"))
    partial = float(hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
    scaling = dict(hf.get("rope_scaling") or {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    kind = "longrope" if kind == "su" else kind  # Phi-3's first configs called it su
    if kind not in ("default", *kinds):
        supported = ", ".join(("default", *kinds))
        raise UnsupportedArchitectureError(f"{family} rope scaling {kind!r} is not supported ({supported} are)")
    if kind == "default":
        return theta, None, partial
    if kind == "llama3":
        return (
            theta,
            {"rope_type": "llama3", **{k: v for k, v in scaling.items() if isinstance(v, (int, float)) and k != "rope_theta"}},
            partial,
        )
    maximum = int(hf.get("max_position_embeddings", 4096))
    original = int(hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") or maximum)
    factor = float(scaling.get("factor") or maximum / original)
    attention = scaling.get("attention_factor")
    if attention is None:  # as transformers computes it: the LongRoPE paper's
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return (
        theta,
        {
            "rope_type": "longrope",
            "short_factor": list(scaling.get("short_factor") or []),
            "long_factor": list(scaling.get("long_factor") or []),
            "original_max_position_embeddings": original,
            "attention_factor": float(attention),
        },
        partial,
    )


def _decoder_config(
    family: str,
    hf: Mapping[str, Any],
    *,
    activations: tuple[str, ...] = ("silu",),
    activation_key: str = "hidden_act",
    rope_kinds: tuple[str, ...] = (),
    tied_default: bool = False,
) -> dict[str, Any]:
    """The fields every rotary decoder shares, read as Llama's are."""
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise SourceError(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    act = hf.get(activation_key) or hf.get("hidden_act") or activations[0]
    if act not in activations:
        raise UnsupportedArchitectureError(f"{family} {activation_key} {act!r} is not supported ({', '.join(activations)})")
    theta, scaling, partial = _rope_of(family, hf, rope_kinds)
    eos = hf.get("eos_token_id")
    tied = hf.get("tie_word_embeddings")
    return {
        "architecture": family,
        "vocab_size": require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": require(hf, "intermediate_size"),
        "num_hidden_layers": require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": int(hf.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(hf.get("rms_norm_eps", LLAMA.default("rms_norm_eps"))),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": partial,
        "max_position_embeddings": int(hf.get("max_position_embeddings", LLAMA.default("max_position_embeddings"))),
        "tie_word_embeddings": bool(tied_default if tied is None else tied),
        "attention_bias": bool(hf.get("attention_bias", False)),
        "bos_token_id": hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        "eos_token_id": [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)],
        "sliding_window": None,
        "layer_types": None,
    }


def _qwen_windows(config: dict[str, Any], hf: Mapping[str, Any]) -> dict[str, Any]:
    """Qwen2/Qwen3: a window only when use_sliding_window, on the blocks from max_window_layers on."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window:
        blocks, first = config["num_hidden_layers"], int(hf.get("max_window_layers") or 0)
        types = hf.get("layer_types") or [_ATTENTION_KINDS[i >= first] for i in range(blocks)]
        config |= {"sliding_window": int(window), "layer_types": list(types)}
    return config


def _qwen2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    return _qwen_windows(_decoder_config("qwen2", hf, rope_kinds=("llama3",)), hf)


def _qwen3_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    return _qwen_windows(_decoder_config("qwen3", hf, rope_kinds=("llama3",)), hf)


def _mistral_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = _decoder_config("mistral", hf, rope_kinds=("llama3",))
    config["sliding_window"] = hf.get("sliding_window")  # every block, when set (null in Mistral 7B v0.2 on)
    return config


def _phi3_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = _decoder_config("phi3", hf, rope_kinds=("longrope",))
    config["sliding_window"] = hf.get("sliding_window")
    return config


def _gemma2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = _decoder_config(
        "gemma2", hf, activations=("gelu_pytorch_tanh", "gelu_new"), activation_key="hidden_activation", tied_default=True
    )
    window = hf.get("sliding_window", 4096)
    blocks = config["num_hidden_layers"]
    types = hf.get("layer_types") or [_ATTENTION_KINDS[i % 2 == 0] for i in range(blocks)]  # even blocks slide
    config |= {
        "sliding_window": window,
        "layer_types": list(types) if window else None,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or config["head_dim"]),
        "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
        "final_logit_softcapping": hf.get("final_logit_softcapping"),
    }
    return config


def _gpt2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = require(hf, "n_embd")
    heads = require(hf, "n_head")
    if hidden % heads:
        raise SourceError(f"config.json: n_embd {hidden} is not divisible by n_head {heads}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedArchitectureError(f"gpt2 activation_function {act!r} is not supported (gelu_new, gelu_pytorch_tanh)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UnsupportedArchitectureError("gpt2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
    eos = hf.get("eos_token_id")
    return {
        "architecture": "gpt2",
        "vocab_size": require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": int(hf.get("n_inner") or 4 * hidden),
        "num_hidden_layers": require(hf, "n_layer"),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "layer_norm_eps": float(hf.get("layer_norm_epsilon", GPT2.default("layer_norm_eps"))),
        "max_position_embeddings": require(hf, "n_positions"),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
        "bos_token_id": hf.get("bos_token_id") if isinstance(hf.get("bos_token_id"), int) else None,
        "eos_token_id": [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)],
    }


def _gpt2_name(name: str) -> str | None:
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # the causal-mask buffers old checkpoints store
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # hub gpt2 has no prefix


def _gpt2_transposed(name: str) -> bool:
    """GPT-2's Conv1D stores (in, out): the converter writes it as (out, in), the runtime's orientation."""
    return name.startswith("transformer.h.") and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


def _decoder_dims(layout: DecoderLayout, biases: Callable[[Mapping[str, Any]], set[str]]) -> Callable[..., dict]:
    """A layout's tensor names and shapes; ``biases`` names the roles ("qkv", "output", "up", "down") that have biases."""

    def dims(config: Mapping[str, Any]) -> dict[str, tuple[tuple[Dim, ...], bool]]:
        h, f, v, d = ("hidden_size",), ("intermediate_size",), ("vocab_size",), ("head_dim",)
        q, kv = ("num_attention_heads", "head_dim"), ("num_key_value_heads", "head_dim")
        with_bias = biases(config)
        out: dict[str, tuple[tuple[Dim, ...], bool]] = {layout.embed_tokens: ((v, h), True)}
        if layout.positions is not None:
            out[layout.positions] = ((("max_position_embeddings",), h), True)

        def norm(name: str) -> None:
            out[name + ".weight"] = ((h,), True)
            if layout.norm == "layer":
                out[name + ".bias"] = ((h,), True)

        def projection(name: str, rows: Dim, columns: Dim, role: str) -> None:
            out[name + ".weight"] = ((rows, columns), True)
            out[name + ".bias"] = ((rows,), role in with_bias)

        for i in range(config["num_hidden_layers"]):
            prefix = layout.block.format(i=i)
            if layout.attention_norm is not None:
                norm(prefix + layout.attention_norm)
            qkv_rows = (q, kv, kv) if len(layout.qkv) == 3 else (("qkv_width",),)
            for name, rows in zip(layout.qkv, qkv_rows, strict=True):
                projection(prefix + name, rows, h, "qkv")
            for name, width in ((layout.q_norm, q), (layout.k_norm, kv)):
                if name is not None:
                    out[prefix + name + ".weight"] = ((d if layout.qk_norm_per_head else width,), True)
            projection(prefix + layout.output, h, q, "output")
            if layout.post_attention_norm is not None:
                norm(prefix + layout.post_attention_norm)
            if layout.mlp_norm is not None:
                norm(prefix + layout.mlp_norm)
            for name in layout.up:
                projection(prefix + name, ("gate_up_width",) if layout.gated and len(layout.up) == 1 else f, h, "up")
            projection(prefix + layout.down, h, f, "down")
            if layout.post_mlp_norm is not None:
                norm(prefix + layout.post_mlp_norm)
        norm(layout.final_norm)
        out[layout.lm_head] = ((v, h), not config["tie_word_embeddings"])  # tied: the head reads the token table
        return out

    return dims


def _decoder_check(values: dict[str, Any]) -> None:
    """Llama's relations, the derived fused widths, and each block's attention kind."""
    _llama_check(values)
    values["qkv_width"] = (values["num_attention_heads"] + 2 * values["num_key_value_heads"]) * values["head_dim"]
    values["gate_up_width"] = 2 * values["intermediate_size"]
    types, blocks = values.get("layer_types"), values["num_hidden_layers"]
    if types is not None and len(types) != blocks:
        raise ManifestSchemaError(f"model config: layer_types has {len(types)} entries for num_hidden_layers={blocks}")
    scaling = values.get("rope_scaling")
    if scaling and scaling["rope_type"] == "longrope":
        rotated = int(values["head_dim"] * values.get("partial_rotary_factor", 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != rotated:
                raise ManifestSchemaError(
                    f"model config: rope_scaling.{key} has {len(scaling[key])} factors, the rotated half-dimension is {rotated}"
                )


_DECODER_FIELDS = (
    Field("vocab_size", COUNT),
    Field("hidden_size", COUNT),
    Field("intermediate_size", COUNT),
    Field("num_hidden_layers", COUNT),
    Field("num_attention_heads", COUNT),
    Field("num_key_value_heads", COUNT),
    Field("head_dim", COUNT),
    Field("max_position_embeddings", POSITIONS, 2048),
    Field("tie_word_embeddings", flag, False),
    Field("bos_token_id", optional_id, None),
    Field("eos_token_id", _eos_ids, []),
)
_ROTARY_FIELDS = (
    *_DECODER_FIELDS,
    Field("rms_norm_eps", EPS, 1e-6),
    Field("rope_theta", real(1e-6, 1e300), 10000.0),
    Field("rope_scaling", _any_rope_scaling, None),
    Field("partial_rotary_factor", real(1e-6, 1.0), 1.0),
    Field("attention_bias", flag, False),
    Field("sliding_window", _optional_count, None),  # keys within this distance of the query (None: all)
    Field("layer_types", _layer_types, None),  # per block, full_attention or sliding_attention (None: the window, if any, everywhere)
)


def _llama_like(**roles: Any) -> DecoderLayout:
    return dataclasses.replace(LLAMA_LAYOUT, **roles)


def _attention_bias(config: Mapping[str, Any]) -> set[str]:
    return {"qkv", "output"} if config.get("attention_bias") else set()


def _rotary_family(name: str, normalize: Callable[..., dict], layout: DecoderLayout, biases=_attention_bias, extra=()) -> Architecture:
    return Architecture(
        name=name,
        model_types=(name,),
        fields=(*_ROTARY_FIELDS, *extra),
        normalize_config=normalize,
        canonical_name=_llama_name,
        first_prefix="model.embed_tokens.",
        row_table=layout.embed_tokens,
        tensor_dims=_decoder_dims(layout, biases),
        check_config=_decoder_check,
        decoder=layout,
    )


QWEN2 = _rotary_family("qwen2", _qwen2_config, LLAMA_LAYOUT, biases=lambda config: {"qkv"})  # q, k, v biases; none on o
QWEN3 = _rotary_family("qwen3", _qwen3_config, _llama_like(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
MISTRAL = _rotary_family("mistral", _mistral_config, LLAMA_LAYOUT)
PHI3 = _rotary_family("phi3", _phi3_config, _llama_like(qkv=("self_attn.qkv_proj",), up=("mlp.gate_up_proj",)))
GEMMA2 = _rotary_family(
    "gemma2",
    _gemma2_config,
    _llama_like(
        post_attention_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        norm="rms_plus_one",
        activation="gelu_tanh",
        embedding_scale=True,
    ),
    extra=(
        Field("query_pre_attn_scalar", _optional_real, None),  # scores scale by its -1/2 power (None: head_dim)
        Field("attn_logit_softcapping", _optional_real, None),  # scores -> cap * tanh(scores / cap)
        Field("final_logit_softcapping", _optional_real, None),
    ),
)


def _olmo2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    return _decoder_config("olmo2", hf, rope_kinds=("llama3",))


def _granite_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = _decoder_config("granite", hf, rope_kinds=("llama3",))
    config["mlp_bias"] = bool(hf.get("mlp_bias", False))
    for key in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"):
        config[key] = float(hf.get(key) if hf.get(key) is not None else GRANITE.default(key))
    return config


OLMO2 = _rotary_family(
    "olmo2",
    _olmo2_config,
    _llama_like(
        attention_norm=None,  # norms of the attention's and the MLP's outputs only
        mlp_norm=None,
        post_attention_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        qk_norm_per_head=False,
    ),
)
GRANITE = _rotary_family(
    "granite",
    _granite_config,
    LLAMA_LAYOUT,
    biases=lambda config: _attention_bias(config) | ({"up", "down"} if config.get("mlp_bias") else set()),
    extra=(
        Field("mlp_bias", flag, False),
        Field("embedding_multiplier", real(1e-6, 1e6), 1.0),  # embeddings times this
        Field("attention_multiplier", real(1e-6, 1e6), 1.0),  # scores times this instead of 1/sqrt(head_dim)
        Field("residual_multiplier", real(1e-6, 1e6), 1.0),  # each block's attention and MLP outputs times this
        Field("logits_scaling", real(1e-6, 1e6), 1.0),  # logits divided by this
    ),
)


def _stablelm_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm") or hf.get("use_parallel_residual"):
        raise UnsupportedArchitectureError("stablelm with qk_layernorm or use_parallel_residual is not supported")
    config = _decoder_config("stablelm", hf, rope_kinds=("llama3",))
    config["rms_norm_eps"] = float(hf.get("layer_norm_eps", 1e-5))  # the field is every norm's eps; StableLM's are LayerNorms
    config["qkv_bias"] = bool(hf.get("use_qkv_bias", False))
    return config


STABLELM = _rotary_family(
    "stablelm",
    _stablelm_config,
    _llama_like(norm="layer"),
    biases=lambda config: {"qkv"} if config.get("qkv_bias") else set(),
    extra=(Field("qkv_bias", flag, False),),
)

GPT2_LAYOUT = DecoderLayout(
    embed_tokens="transformer.wte.weight",
    positions="transformer.wpe.weight",
    block="transformer.h.{i}.",
    attention_norm="ln_1",
    qkv=("attn.c_attn",),
    output="attn.c_proj",
    mlp_norm="ln_2",
    up=("mlp.c_fc",),
    down="mlp.c_proj",
    final_norm="transformer.ln_f",
    norm="layer",
    activation="gelu_tanh",
    gated=False,
)

GPT2 = Architecture(
    name="gpt2",
    model_types=("gpt2",),
    fields=(*_DECODER_FIELDS, Field("layer_norm_eps", EPS, 1e-5)),
    normalize_config=_gpt2_config,
    canonical_name=_gpt2_name,
    first_prefix=("transformer.wte.", "transformer.wpe."),  # both tables in layer 0: positions are added at the embeddings
    row_table=GPT2_LAYOUT.embed_tokens,
    tensor_dims=_decoder_dims(GPT2_LAYOUT, lambda config: {"qkv", "output", "up", "down"}),
    check_config=_decoder_check,
    decoder=GPT2_LAYOUT,
    source_transposed=_gpt2_transposed,
)


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
