"""Decoders with Llama's block (a norm before attention and before the MLP): Qwen2, Qwen3, Mistral, Granite, StableLM.

Each is its config normalisation plus, where it differs, a layout, biases and fields of its own. Pure descriptions,
built once at import: no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ...errors import UnsupportedArchitectureError
from ..family import Field, flag, real
from .decoders import ATTENTION_KINDS, attention_bias, decoder_config, llama_like, rotary_family
from .llama import LLAMA_LAYOUT

__all__ = ["GRANITE", "MISTRAL", "QWEN2", "QWEN3", "STABLELM"]


def _qwen_config(family: str) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
    """Qwen2/Qwen3: a window only when use_sliding_window, on the blocks from max_window_layers on."""

    def normalize(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
        config = decoder_config(family, hf, rope_kinds=("llama3",))
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        if window:
            blocks, first = config["num_hidden_layers"], int(hf.get("max_window_layers") or 0)
            types = hf.get("layer_types") or [ATTENTION_KINDS[i >= first] for i in range(blocks)]
            config |= {"sliding_window": int(window), "layer_types": list(types)}
        return config

    return normalize


def _mistral_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = decoder_config("mistral", hf, rope_kinds=("llama3",))
    config["sliding_window"] = hf.get("sliding_window")  # every block, when set (null in Mistral 7B v0.2 on)
    return config


def _granite_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = decoder_config("granite", hf, rope_kinds=("llama3",))
    config["mlp_bias"] = bool(hf.get("mlp_bias", False))
    for key in ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling"):
        config[key] = float(hf.get(key) if hf.get(key) is not None else GRANITE.default(key))
    return config


def _stablelm_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("qk_layernorm") or hf.get("use_parallel_residual"):
        raise UnsupportedArchitectureError("stablelm with qk_layernorm or use_parallel_residual is not supported")
    config = decoder_config("stablelm", hf, rope_kinds=("llama3",))
    config["rms_norm_eps"] = float(hf.get("layer_norm_eps", 1e-5))  # the field is every norm's eps; StableLM's are LayerNorms
    config["qkv_bias"] = bool(hf.get("use_qkv_bias", False))
    return config


QWEN2 = rotary_family("qwen2", _qwen_config("qwen2"), LLAMA_LAYOUT, biases=lambda config: {"qkv"})  # q, k, v biases; none on o
QWEN3 = rotary_family("qwen3", _qwen_config("qwen3"), llama_like(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"))
MISTRAL = rotary_family("mistral", _mistral_config, LLAMA_LAYOUT)
GRANITE = rotary_family(
    "granite",
    _granite_config,
    LLAMA_LAYOUT,
    biases=lambda config: attention_bias(config) | ({"up", "down"} if config.get("mlp_bias") else set()),
    extra=(
        Field("mlp_bias", flag, False),
        Field("embedding_multiplier", real(1e-6, 1e6), 1.0),  # embeddings times this
        Field("attention_multiplier", real(1e-6, 1e6), 1.0),  # scores times this instead of 1/sqrt(head_dim)
        Field("residual_multiplier", real(1e-6, 1e6), 1.0),  # each block's attention and MLP outputs times this
        Field("logits_scaling", real(1e-6, 1e6), 1.0),  # logits divided by this
    ),
)
STABLELM = rotary_family(
    "stablelm",
    _stablelm_config,
    llama_like(norm="layer"),
    biases=lambda config: {"qkv"} if config.get("qkv_bias") else set(),
    extra=(Field("qkv_bias", flag, False),),
)
