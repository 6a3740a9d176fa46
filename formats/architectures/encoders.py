"""The encoder families: BERT (and sentence-transformers' pooling over it), described with ``family.py``'s parts.

Pure descriptions, built once at import: no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ConversionInputError, ManifestSchemaError, UnsupportedArchitectureError
from ..constants import MAX_STORE_SIZE_BYTES
from ..family import COUNT, EPS, POSITIONS, Architecture, Dim, Field, choice, counts, flag, integer, require

__all__ = ["BERT"]

_BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_BERT_POOLING = ("mean", "cls", "max")  # sentence-transformers' pooling modes


def _bert_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = require(hf, "hidden_size")
    heads = require(hf, "num_attention_heads")
    if hidden % heads:
        raise ConversionInputError(f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
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
        *counts("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
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
