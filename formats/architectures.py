"""One description per model family: config fields and defaults, tensor names and shapes, layers.

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
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ManifestSchemaError, SourceError, UnsupportedArchitectureError
from .constants import MAX_STORE_SIZE_BYTES, LayerKind
from .manifest import Manifest

MAX_POSITIONS = 1 << 24
"""Largest max_position_embeddings / max_seq_length a model may declare (16 M tokens)."""

REQUIRED = object()
"""A field's default when the config must give it."""

Dim = tuple[str, ...]
"""One tensor dimension: the product of these config fields."""


# ---------------------------------------------------------------- config fields


def _fail(name: str, value: Any, expected: str) -> ManifestSchemaError:
    return ManifestSchemaError(f"model config: {name}={value!r} is invalid: expected {expected}; the file is damaged or hostile")


def _integer(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise _fail(name, value, f"an integer in [{low}, {high}]")
        return value

    return parse


def _real(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(name: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
            raise _fail(name, value, f"a finite number in [{low:g}, {high:g}]")
        return float(value)

    return parse


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


def _choice(*options: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise _fail(name, value, "one of " + ", ".join(options))
        return value

    return parse


def _optional_id(name: str, value: Any) -> int | None:
    return None if value is None else _integer(0, MAX_STORE_SIZE_BYTES)(name, value)


def _id_list(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise _fail(name, value, "a list of at most 64 token ids")
    return tuple(_integer(0, MAX_STORE_SIZE_BYTES)(name, v) for v in value)


_COUNT = _integer(1, MAX_STORE_SIZE_BYTES)
_POSITIONS = _integer(1, MAX_POSITIONS)
_EPS = _real(0.0, 1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One manifest config field the runtime reads."""

    name: str
    parse: Callable[[str, Any], Any]  # (name, raw value) -> checked value; raises ManifestSchemaError
    default: Any = REQUIRED


# ---------------------------------------------------------------- the description


@dataclasses.dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # HF config "model_type" values handled
    fields: tuple[Field, ...]
    normalize_config: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]  # HF config, extras -> manifest config
    canonical_name: Callable[[str], str | None]  # HF tensor name -> stored name, or None to drop
    first_prefix: str  # names starting with this are layer 0 (the embeddings)
    row_table: str  # the token-embedding table: stored as a row table after the steps, read a few rows at a time
    tensor_dims: Callable[[Mapping[str, Any]], dict[str, tuple[tuple[Dim, ...], bool]]]  # name -> (dims, required)
    check_config: Callable[[dict[str, Any]], None]  # relations between fields; fills derived defaults

    def default(self, key: str) -> Any:
        """A field's default (the one place it is written)."""
        for field in self.fields:
            if field.name == key:
                return field.default
        raise KeyError(key)

    def read_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Every field checked and defaulted (no tensor shapes involved).

        Raises:
            ManifestSchemaError: naming the field and its value.
        """
        values: dict[str, Any] = {}
        for field in self.fields:
            raw = config.get(field.name, field.default)
            if raw is REQUIRED:
                raise ManifestSchemaError(f"model config: {field.name} is missing; the file is damaged or was not written by streamload")
            values[field.name] = field.parse(field.name, raw)
        self.check_config(values)
        return values

    def layer_of(self, name: str, block_count: int) -> int:
        """Stored tensor name -> layer index."""
        if name.startswith(self.first_prefix):
            return 0
        match = _BLOCK.match(name)
        if match:
            index = int(match.group(1))
            if index >= block_count:
                raise SourceError(f"tensor {name!r} belongs to block {index}, but the config has {block_count} blocks")
            return index + 1
        return block_count + 1

    def expected_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor the runtime needs, with its shape, for a config."""
        return {name: _shape(dims, config) for name, (dims, required) in self.tensor_dims(config).items() if required}

    def validate(self, config: Mapping[str, Any], manifest: Manifest) -> dict[str, Any]:
        """Check the config against the manifest's layers and tensors, before anything is allocated.

        Returns:
            The checked config with defaults filled in.

        Raises:
            ManifestSchemaError: naming the field, its value and the tensor shape it contradicts.
        """
        values = self.read_config(config)
        blocks = values["num_hidden_layers"]
        if manifest.step_count != blocks + 2:
            raise ManifestSchemaError(
                f"model config: num_hidden_layers={blocks} contradicts the file's {manifest.step_count} execution steps "
                "(embeddings + blocks + head)"
            )
        for layer in manifest.layers[manifest.step_count :]:
            held = [t.name for t in manifest.tensors if t.layer_index == layer.index]
            if held != [self.row_table]:
                raise ManifestSchemaError(f"model file: row table {layer.name!r} holds {held}, expected [{self.row_table!r}]")
        for name, (dims, required) in self.tensor_dims(values).items():
            entry = manifest.tensor_by_name.get(name)
            if entry is None:
                if required:
                    raise ManifestSchemaError(
                        f"model config: {_describe(dims, values)} implies tensor {name!r}, which the file does not hold"
                    )
                continue
            if len(entry.shape) != len(dims):
                raise ManifestSchemaError(f"model config: tensor {name!r} has shape {entry.shape}, expected {len(dims)} dimensions")
            for axis, (dim, actual) in enumerate(zip(dims, entry.shape, strict=True)):
                expected = math.prod(values[f] for f in dim)
                if expected != actual:
                    product = f" = {expected}" if len(dim) > 1 else ""
                    raise ManifestSchemaError(
                        f"model config: {_describe((dim,), values)}{product} contradicts tensor {name!r} of shape {entry.shape} "
                        f"(dimension {axis} is {actual})"
                    )
            in_row_table = name == self.row_table and manifest.layers[entry.layer_index].kind is LayerKind.ROWS
            if entry.layer_index != self.layer_of(name, blocks) and not in_row_table:
                raise ManifestSchemaError(
                    f"model config: tensor {name!r} is in layer {entry.layer_index}, "
                    f"the runtime reads it from layer {self.layer_of(name, blocks)}"
                )
        return values


def _shape(dims: tuple[Dim, ...], config: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(math.prod(config[f] for f in dim) for dim in dims)


def _describe(dims: tuple[Dim, ...], config: Mapping[str, Any]) -> str:
    return ", ".join(" x ".join(f"{f}={config[f]}" for f in dim) for dim in dims)


_BLOCK = re.compile(r"^(?:encoder\.layer|model\.layers)\.(\d+)\.")


def _require(config: Mapping[str, Any], key: str, kind: type = int) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
        raise SourceError(f"config.json: {key!r} is missing or invalid ({value!r}); it is needed to convert this model")
    return value


# ---------------------------------------------------------------- BERT

_BERT_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
_BERT_POOLING = ("mean", "cls", "max")  # sentence-transformers' pooling modes


def _bert_config(hf: Mapping[str, Any], extras: Mapping[str, Any]) -> dict[str, Any]:
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
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
        "vocab_size": _require(hf, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": _require(hf, "num_hidden_layers"),
        "num_attention_heads": heads,
        "intermediate_size": _require(hf, "intermediate_size"),
        "max_position_embeddings": _require(hf, "max_position_embeddings"),
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
        Field("vocab_size", _COUNT),
        Field("hidden_size", _COUNT),
        Field("num_hidden_layers", _COUNT),
        Field("num_attention_heads", _COUNT),
        Field("intermediate_size", _COUNT),
        Field("max_position_embeddings", _POSITIONS),
        Field("type_vocab_size", _COUNT, 2),
        Field("layer_norm_eps", _EPS, 1e-12),
        Field("hidden_act", _choice(*_BERT_ACTIVATIONS), "gelu"),
        Field("pad_token_id", _integer(0, MAX_STORE_SIZE_BYTES), 0),
        Field("pooling", _choice(*_BERT_POOLING), "mean"),
        Field("normalize", _flag, False),
        Field(
            "max_seq_length", lambda name, value: None if value is None else _POSITIONS(name, value), None
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
    hidden = _require(hf, "hidden_size")
    heads = _require(hf, "num_attention_heads")
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
        "vocab_size": _require(hf, "vocab_size"),
        "hidden_size": hidden,
        "intermediate_size": _require(hf, "intermediate_size"),
        "num_hidden_layers": _require(hf, "num_hidden_layers"),
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
        raise _fail(name, value, "a map or nil")
    kind = value.get("rope_type", value.get("type"))
    if kind != "llama3":
        raise _fail(name, value, "llama3 scaling (the only kind the runtime applies)")
    checked = {
        "factor": _real(1e-6, 1e6)(name + ".factor", value.get("factor")),
        "low_freq_factor": _real(1e-6, 1e6)(name + ".low_freq_factor", value.get("low_freq_factor", 1.0)),
        "high_freq_factor": _real(1e-6, 1e6)(name + ".high_freq_factor", value.get("high_freq_factor", 4.0)),
        "original_max_position_embeddings": _real(1, MAX_POSITIONS)(
            name + ".original_max_position_embeddings", value.get("original_max_position_embeddings", 8192)
        ),
    }
    if checked["high_freq_factor"] <= checked["low_freq_factor"]:
        raise _fail(name, value, "high_freq_factor > low_freq_factor")
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
    return _id_list(name, [value] if isinstance(value, int) and not isinstance(value, bool) else value)


LLAMA = Architecture(
    name="llama",
    model_types=("llama",),
    fields=(
        Field("vocab_size", _COUNT),
        Field("hidden_size", _COUNT),
        Field("intermediate_size", _COUNT),
        Field("num_hidden_layers", _COUNT),
        Field("num_attention_heads", _COUNT),
        Field("num_key_value_heads", _COUNT),
        Field("head_dim", _COUNT),
        Field("rms_norm_eps", _EPS, 1e-6),
        Field("rope_theta", _real(1e-6, 1e300), 10000.0),
        Field("rope_scaling", _rope_scaling, None),
        Field("max_position_embeddings", _POSITIONS, 2048),
        Field("tie_word_embeddings", _flag, False),
        Field("attention_bias", _flag, False),
        Field("mlp_bias", _flag, False),
        Field("bos_token_id", _optional_id, None),
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
