"""The toolkit a model family is described with (no family here; ``architectures/`` holds them).

A family's config fields (type, bounds, default), tensor dimensions as products of config fields, and the check of
a model's config against the tensors its manifest holds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConversionInputError, ManifestSchemaError
from .constants import MAX_STORE_SIZE_BYTES, LayerKind
from .manifest import Manifest

MAX_POSITIONS = 1 << 24
"""Largest max_position_embeddings / max_seq_length a model may declare (16 M tokens)."""

REQUIRED = object()
"""A field's default when the config must give it."""

Dim = tuple[str, ...]
"""One tensor dimension: the product of these config fields."""


# ---------------------------------------------------------------- config fields


def fail(name: str, value: Any, expected: str) -> ManifestSchemaError:
    return ManifestSchemaError(f"model config: {name}={value!r} is invalid: expected {expected}; the file is damaged or hostile")


def integer(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise fail(name, value, f"an integer in [{low}, {high}]")
        return value

    return parse


def real(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(name: str, value: Any) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not low <= value <= high:
            raise fail(name, value, f"a finite number in [{low:g}, {high:g}]")
        return float(value)

    return parse


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(name, value, "true or false")
    return value


def choice(*options: str) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if value not in options or not isinstance(value, str):
            raise fail(name, value, "one of " + ", ".join(options))
        return value

    return parse


def optional_id(name: str, value: Any) -> int | None:
    return None if value is None else integer(0, MAX_STORE_SIZE_BYTES)(name, value)


def id_list(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise fail(name, value, "a list of at most 64 token ids")
    return tuple(integer(0, MAX_STORE_SIZE_BYTES)(name, v) for v in value)


COUNT = integer(1, MAX_STORE_SIZE_BYTES)
POSITIONS = integer(1, MAX_POSITIONS)
EPS = real(0.0, 1.0)


@dataclasses.dataclass(frozen=True, slots=True)
class Field:
    """One manifest config field the runtime reads."""

    name: str
    parse: Callable[[str, Any], Any]  # (name, raw value) -> checked value; raises ManifestSchemaError
    default: Any = REQUIRED


def counts(*names: str) -> tuple[Field, ...]:
    """A required positive count for each name, in this order: the sizes a family declares."""
    return tuple(Field(name, COUNT) for name in names)


# ---------------------------------------------------------------- the description


@dataclasses.dataclass(frozen=True, slots=True)
class DecoderLayout:
    """A decoder family's tensor roles and the runtime pieces it selects; the runtime reads names only from here.

    Names inside a block are relative to ``block`` (``{i}`` is the block index) and leave off ``.weight``/``.bias``.
    """

    embed_tokens: str  # the token table (the row table)
    block: str  # e.g. "model.layers.{i}."
    attention_norm: str | None  # None: the block's input goes to attention unnormalised (OLMo 2 norms outputs only)
    qkv: tuple[str, ...]  # q, k and v projections, or one fused projection whose rows are q, k, v in that order
    output: str
    mlp_norm: str | None
    up: tuple[str, ...]  # gate and up (two, or one fused as [gate; up]) for a gated MLP, else the one input projection
    down: str
    final_norm: str
    lm_head: str = "lm_head.weight"  # absent when tied: the head reads the token table
    positions: str | None = None  # a learned position table in layer 0 (GPT-2) instead of rotary embeddings
    q_norm: str | None = None  # RMSNorm of queries and keys before rotation: per head (Qwen3), or across heads
    k_norm: str | None = None
    qk_norm_per_head: bool = True  # False: over the whole projection, every head at once (OLMo 2)
    post_attention_norm: str | None = None  # a norm of the attention's output before the residual add (Gemma 2)
    post_mlp_norm: str | None = None
    norm: str = "rms"  # "rms"; "rms_plus_one": RMSNorm scaled by (1 + weight) (Gemma); "layer": LayerNorm with bias
    activation: str = "silu"  # "silu" or "gelu_tanh" (gelu_new, gelu_pytorch_tanh)
    gated: bool = True  # down(act(gate) * up); else down(act(up))
    embedding_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)

    def name(self, index: int, role: str, suffix: str = ".weight") -> str:
        """A block tensor's stored name: ``name(0, layout.output)`` -> "model.layers.0.self_attn.o_proj.weight"."""
        return self.block.format(i=index) + role + suffix


# ---------------------------------------------------------------- the description


@dataclasses.dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]  # HF config "model_type" values handled
    fields: tuple[Field, ...]
    normalize_config: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]  # HF config, extras -> manifest config
    canonical_name: Callable[[str], str | None]  # HF tensor name -> stored name, or None to drop
    first_prefix: str | tuple[str, ...]  # names starting with this (or one of these) are layer 0 (the embeddings)
    row_table: str  # the token-embedding table: stored as a row table after the steps, read a few rows at a time
    tensor_dims: Callable[[Mapping[str, Any]], dict[str, tuple[tuple[Dim, ...], bool]]]  # name -> (dims, required)
    check_config: Callable[[dict[str, Any]], None]  # relations between fields; fills derived defaults
    decoder: DecoderLayout | None = None  # a decoder's tensor roles and the runtime pieces it selects (None: an encoder)
    source_transposed: Callable[[str], bool] = lambda name: False  # stored name -> the source holds it as (in, out)

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
        """Stored tensor name -> layer index (the first prefix's tensors, e.g. token and position tables, are layer 0)."""
        if name.startswith(self.first_prefix):
            return 0
        match = BLOCK_NAME.match(name)
        if match:
            index = int(match.group(1))
            if index >= block_count:
                raise ConversionInputError(f"tensor {name!r} belongs to block {index}, but the config has {block_count} blocks")
            return index + 1
        return block_count + 1

    def expected_shapes(self, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every tensor the runtime needs, with its shape, for a config."""
        values = dict(config)
        self.check_config(values)  # fills in derived sizes (a fused projection's rows)
        return {name: _shape(dims, values) for name, (dims, required) in self.tensor_dims(values).items() if required}

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


BLOCK_NAME = re.compile(r"^(?:encoder\.layer|model\.layers|transformer\.h)\.(\d+)\.")


def require(config: Mapping[str, Any], key: str, kind: type = int) -> Any:
    value = config.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
        raise ConversionInputError(f"config.json: {key!r} is missing or invalid ({value!r}); it is needed to convert this model")
    return value


def token_ids(config: Mapping[str, Any]) -> dict[str, Any]:
    """A decoder's ``bos_token_id`` (None unless an integer) and ``eos_token_id`` (a list of its integers)."""
    bos, eos = config.get("bos_token_id"), config.get("eos_token_id")
    return {
        "bos_token_id": bos if isinstance(bos, int) else None,
        "eos_token_id": [eos] if isinstance(eos, int) else [e for e in (eos or []) if isinstance(e, int)],
    }
