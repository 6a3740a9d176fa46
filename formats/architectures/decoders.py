"""What the decoders beyond Llama share: their fields, config reading, rope kinds, tensor shapes and checks.

Each such family is a Hugging Face config normalisation plus a ``DecoderLayout``: the tensor names and shapes come
from the layout (``decoder_dims``), the runtime reads the same layout (streamload/runtime/llama.py), and
``rotary_family`` builds the ``Architecture``. Pure descriptions, built once at import: no threads, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from ...errors import ManifestSchemaError, UnsupportedArchitectureError
from ..family import (
    COUNT,
    EPS,
    MAX_POSITIONS,
    POSITIONS,
    Architecture,
    DecoderLayout,
    Dim,
    Field,
    choice,
    counts,
    fail,
    flag,
    optional_id,
    real,
    token_ids,
)
from .llama import (
    DECODER_SIZES,
    LLAMA,
    LLAMA_LAYOUT,
    attention_heads,
    check_heads,
    decoder_sizes,
    eos_ids,
    llama_name,
    rope_scaling,
)

__all__ = [
    "ATTENTION_KINDS",
    "DECODER_FIELDS",
    "attention_bias",
    "decoder_check",
    "decoder_config",
    "decoder_dims",
    "llama_like",
    "optional_real",
    "rotary_family",
]

ATTENTION_KINDS = ("full_attention", "sliding_attention")
"""A block's attention in ``layer_types``, indexed by "does it slide"."""


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else COUNT(name, value)


def optional_real(name: str, value: Any) -> float | None:
    """nil, or a finite number in [1e-6, 1e6]."""
    return None if value is None else real(1e-6, 1e6)(name, value)


def _layer_types(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_POSITIONS:
        raise fail(name, value, "a list of " + " or ".join(ATTENTION_KINDS))
    return tuple(choice(*ATTENTION_KINDS)(name, kind) for kind in value)


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
    return rope_scaling(name, value)


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


def decoder_config(
    family: str,
    hf: Mapping[str, Any],
    *,
    activations: tuple[str, ...] = ("silu",),
    activation_key: str = "hidden_act",
    rope_kinds: tuple[str, ...] = (),
    tied_default: bool = False,
) -> dict[str, Any]:
    """The fields every rotary decoder shares, read as Llama's are."""
    hidden, heads, kv_heads = attention_heads(hf)
    act = hf.get(activation_key) or hf.get("hidden_act") or activations[0]
    if act not in activations:
        raise UnsupportedArchitectureError(f"{family} {activation_key} {act!r} is not supported ({', '.join(activations)})")
    theta, scaling, partial = _rope_of(family, hf, rope_kinds)
    tied = hf.get("tie_word_embeddings")
    return {
        "architecture": family,
        **decoder_sizes(hf, hidden, heads, kv_heads),
        "rms_norm_eps": float(hf.get("rms_norm_eps", LLAMA.default("rms_norm_eps"))),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "partial_rotary_factor": partial,
        "max_position_embeddings": int(hf.get("max_position_embeddings", LLAMA.default("max_position_embeddings"))),
        "tie_word_embeddings": bool(tied_default if tied is None else tied),
        "attention_bias": bool(hf.get("attention_bias", False)),
        **token_ids(hf),
        "sliding_window": None,
        "layer_types": None,
    }


def decoder_dims(layout: DecoderLayout, biases: Callable[[Mapping[str, Any]], set[str]]) -> Callable[..., dict]:
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


def decoder_check(values: dict[str, Any]) -> None:
    """Llama's relations, the derived fused widths, and each block's attention kind."""
    check_heads(values)
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


DECODER_FIELDS = (
    *counts(*DECODER_SIZES),
    Field("max_position_embeddings", POSITIONS, 2048),
    Field("tie_word_embeddings", flag, False),
    Field("bos_token_id", optional_id, None),
    Field("eos_token_id", eos_ids, []),
)
"""The fields of every decoder beyond Llama, rotary or not."""

_ROTARY_FIELDS = (
    *DECODER_FIELDS,
    Field("rms_norm_eps", EPS, 1e-6),
    Field("rope_theta", real(1e-6, 1e300), 10000.0),
    Field("rope_scaling", _any_rope_scaling, None),
    Field("partial_rotary_factor", real(1e-6, 1.0), 1.0),
    Field("attention_bias", flag, False),
    Field("sliding_window", _optional_count, None),  # keys within this distance of the query (None: all)
    Field("layer_types", _layer_types, None),  # per block, full_attention or sliding_attention (None: the window, if any, everywhere)
)


def llama_like(**roles: Any) -> DecoderLayout:
    """Llama's layout with these roles changed."""
    return dataclasses.replace(LLAMA_LAYOUT, **roles)


def attention_bias(config: Mapping[str, Any]) -> set[str]:
    """The roles with biases when the config's ``attention_bias`` is set: q, k, v and o."""
    return {"qkv", "output"} if config.get("attention_bias") else set()


def rotary_family(name: str, normalize: Callable[..., dict], layout: DecoderLayout, biases=attention_bias, extra=()) -> Architecture:
    """A rotary decoder named ``name`` (also its model_type): the shared fields plus ``extra``, Llama's tensor naming."""
    return Architecture(
        name=name,
        model_types=(name,),
        fields=(*_ROTARY_FIELDS, *extra),
        normalize_config=normalize,
        canonical_name=llama_name,
        first_prefix="model.embed_tokens.",
        row_table=layout.embed_tokens,
        tensor_dims=decoder_dims(layout, biases),
        check_config=decoder_check,
        decoder=layout,
    )
