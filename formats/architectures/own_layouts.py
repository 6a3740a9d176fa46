"""Decoders whose block is laid out their own way: Phi-3 (fused projections), Gemma 2 (norms around each half),
OLMo 2 (norms of the outputs only) and GPT-2 (its own names, learned positions, Conv1D weights).

Pure descriptions, built once at import: no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ConversionInputError, UnsupportedArchitectureError
from ..family import EPS, Architecture, DecoderLayout, Field, require, token_ids
from .decoders import ATTENTION_KINDS, DECODER_FIELDS, decoder_check, decoder_config, decoder_dims, llama_like, optional_real, rotary_family

__all__ = ["GEMMA2", "GPT2", "GPT2_LAYOUT", "OLMO2", "PHI3"]


def _phi3_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = decoder_config("phi3", hf, rope_kinds=("longrope",))
    config["sliding_window"] = hf.get("sliding_window")
    return config


def _gemma2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    config = decoder_config(
        "gemma2", hf, activations=("gelu_pytorch_tanh", "gelu_new"), activation_key="hidden_activation", tied_default=True
    )
    window = hf.get("sliding_window", 4096)
    blocks = config["num_hidden_layers"]
    types = hf.get("layer_types") or [ATTENTION_KINDS[i % 2 == 0] for i in range(blocks)]  # even blocks slide
    config |= {
        "sliding_window": window,
        "layer_types": list(types) if window else None,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar") or config["head_dim"]),
        "attn_logit_softcapping": hf.get("attn_logit_softcapping"),
        "final_logit_softcapping": hf.get("final_logit_softcapping"),
    }
    return config


def _olmo2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    return decoder_config("olmo2", hf, rope_kinds=("llama3",))


def _gpt2_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = require(hf, "n_embd")
    heads = require(hf, "n_head")
    if hidden % heads:
        raise ConversionInputError(f"config.json: n_embd {hidden} is not divisible by n_head {heads}")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UnsupportedArchitectureError(f"gpt2 activation_function {act!r} is not supported (gelu_new, gelu_pytorch_tanh)")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
        raise UnsupportedArchitectureError("gpt2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
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
        **token_ids(hf),
    }


def _gpt2_name(name: str) -> str | None:
    if name.endswith((".attn.bias", ".attn.masked_bias")):
        return None  # the causal-mask buffers old checkpoints store
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name  # hub gpt2 has no prefix


def _gpt2_transposed(name: str) -> bool:
    """GPT-2's Conv1D stores (in, out): the converter writes it as (out, in), the runtime's orientation."""
    return name.startswith("transformer.h.") and name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))


PHI3 = rotary_family("phi3", _phi3_config, llama_like(qkv=("self_attn.qkv_proj",), up=("mlp.gate_up_proj",)))
GEMMA2 = rotary_family(
    "gemma2",
    _gemma2_config,
    llama_like(
        post_attention_norm="post_attention_layernorm",
        mlp_norm="pre_feedforward_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        norm="rms_plus_one",
        activation="gelu_tanh",
        embedding_scale=True,
    ),
    extra=(
        Field("query_pre_attn_scalar", optional_real, None),  # scores scale by its -1/2 power (None: head_dim)
        Field("attn_logit_softcapping", optional_real, None),  # scores -> cap * tanh(scores / cap)
        Field("final_logit_softcapping", optional_real, None),
    ),
)
OLMO2 = rotary_family(
    "olmo2",
    _olmo2_config,
    llama_like(
        attention_norm=None,  # norms of the attention's and the MLP's outputs only
        mlp_norm=None,
        post_attention_norm="post_attention_layernorm",
        post_mlp_norm="post_feedforward_layernorm",
        q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm",
        qk_norm_per_head=False,
    ),
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
    fields=(*DECODER_FIELDS, Field("layer_norm_eps", EPS, 1e-5)),
    normalize_config=_gpt2_config,
    canonical_name=_gpt2_name,
    first_prefix=("transformer.wte.", "transformer.wpe."),  # both tables in layer 0: positions are added at the embeddings
    row_table=GPT2_LAYOUT.embed_tokens,
    tensor_dims=decoder_dims(GPT2_LAYOUT, lambda config: {"qkv", "output", "up", "down"}),
    check_config=decoder_check,
    decoder=GPT2_LAYOUT,
    source_transposed=_gpt2_transposed,
)
