"""BERT encoder (sentence embeddings, as sentence-transformers computes them) over streamed int8 layers."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RuntimeModelError
from ..formats.architectures import BERT
from ..layer import Layer
from . import ops
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model import Model

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class BertConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float
    hidden_act: str
    max_position_embeddings: int
    pad_token_id: int
    pooling: str  # "mean" | "cls" | "max": sentence-transformers' pooling module
    normalize: bool  # L2-normalise the pooled vector (sentence-transformers' Normalize module)
    max_seq_length: int

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> BertConfig:
        """The fields the encoder reads, checked and defaulted by the BERT family description.

        Raises:
            ManifestSchemaError: a field is missing, mistyped or out of range.
        """
        values = BERT.read_config(config)
        return cls(**{field.name: values[field.name] for field in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedBatch:
    input_ids: np.ndarray  # (B, T) int64
    token_type_ids: np.ndarray  # (B, T)
    attention_mask: np.ndarray  # (B, T) 1 for real tokens


def tokenize(model: Model, texts: Sequence[str], config: BertConfig) -> EncodedBatch:
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise RuntimeModelError("this model has no tokenizer: pass token ids instead of text")
    tokenizer.no_padding()
    limit = min(config.max_seq_length, config.max_position_embeddings)
    tokenizer.enable_truncation(limit)
    encodings = tokenizer.encode_batch(list(texts))
    _warn_truncated(tokenizer, texts, encodings, limit)
    length = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), length), config.pad_token_id, dtype=np.int64)
    types = np.zeros_like(ids)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, : len(e.ids)] = e.ids
        types[row, : len(e.ids)] = e.type_ids
        mask[row, : len(e.ids)] = 1
    return EncodedBatch(ids, types, mask)


def _warn_truncated(tokenizer: Any, texts: Sequence[str], encodings: Sequence[Any], limit: int) -> None:
    """Log how many tokens truncation dropped, as sentence-transformers truncates silently (counted only when it did)."""
    cut = [i for i, e in enumerate(encodings) if e.overflowing]
    if not cut:
        return
    tokenizer.no_truncation()
    try:
        lengths = [len(tokenizer.encode(texts[i]).ids) for i in cut]
    finally:
        tokenizer.enable_truncation(limit)
    dropped = sum(length - limit for length in lengths)
    which = f"text {cut[0] + 1}" if len(cut) == 1 else f"{len(cut)} texts"
    logger.warning("%s longer than the model's %d tokens: %d tokens dropped from the end", which, limit, dropped)


def _weight(layer: Layer, name: str) -> tuple[np.ndarray, np.ndarray | None]:
    if name not in layer:
        raise RuntimeModelError(f"tensor {name!r} is missing from layer {layer.name!r}; the file does not match its config")
    return layer.weight(name)


WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def embed_tokens(layer: Layer, word_rows: tuple[np.ndarray, np.ndarray | None], batch: EncodedBatch, config: BertConfig) -> np.ndarray:
    """Layer 0: word + position + token type embeddings, then LayerNorm. (B, T, H).

    ``word_rows``: the input's rows of the word-embedding table (``Model.rows``), aligned with ``batch.input_ids``.
    """
    length = batch.input_ids.shape[1]
    if length > config.max_position_embeddings:
        raise RuntimeModelError(f"input has {length} tokens; this model takes at most {config.max_position_embeddings}")
    word = ops.embedding_rows(*word_rows)
    position = ops.embedding(np.arange(length), *_weight(layer, "embeddings.position_embeddings.weight"))
    token_type = ops.embedding(batch.token_type_ids, *_weight(layer, "embeddings.token_type_embeddings.weight"))
    h = word + position[None] + token_type  # (B, T, H)
    return ops.layer_norm(h, layer["embeddings.LayerNorm.weight"], layer["embeddings.LayerNorm.bias"], config.layer_norm_eps)


def encoder_block(layer: Layer, h: np.ndarray, mask_bias: np.ndarray, block: int, config: BertConfig) -> np.ndarray:
    """One transformer block, post-norm as in BERT. h: (B, T, H).

    Query, key and value are one matmul (``ops.dense`` on float32 weight copies when the budget allows),
    attention is batched over sentences and heads, and the norms and GELU work in place.
    """
    p = f"encoder.layer.{block}."
    batch, length, hidden = h.shape
    heads = config.num_attention_heads
    head_dim = hidden // heads
    x = h.reshape(batch * length, hidden)

    def projection(name: str) -> ops.Projection:
        weight, scales = _weight(layer, p + name + ".weight")
        return weight, scales, layer[p + name + ".bias"]

    qkv = ops.dense(x, [projection("attention.self.query"), projection("attention.self.key"), projection("attention.self.value")])
    qkv = qkv.reshape(batch, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)  # (3, B, heads, T, d)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scores = q @ k.transpose(0, 1, 3, 2)  # (B, heads, T, T)
    scores *= np.float32(1.0 / np.sqrt(head_dim))
    scores += mask_bias
    context = ops.softmax(scores, out=scores) @ v  # (B, heads, T, d)
    context = context.transpose(0, 2, 1, 3).reshape(batch * length, hidden)
    attended = ops.dense(context, [projection("attention.output.dense")])
    attended += x
    ops.layer_norm(
        attended,
        layer[p + "attention.output.LayerNorm.weight"],
        layer[p + "attention.output.LayerNorm.bias"],
        config.layer_norm_eps,
        out=attended,
    )
    inner = ops.dense(attended, [projection("intermediate.dense")])
    if config.hidden_act.startswith("gelu"):  # tanh form for the exact "gelu" too: cosine to PyTorch unchanged to 1e-4, 2.4x faster
        ops.gelu_tanh(inner, out=inner)
    else:
        np.maximum(inner, 0, out=inner)
    out = ops.dense(inner, [projection("output.dense")])
    out += attended
    ops.layer_norm(out, layer[p + "output.LayerNorm.weight"], layer[p + "output.LayerNorm.bias"], config.layer_norm_eps, out=out)
    return out.reshape(batch, length, hidden)


def pool(h: np.ndarray, mask: np.ndarray, config: BertConfig) -> np.ndarray:
    """sentence-transformers pooling (+ optional L2 normalisation). (B, H)."""
    m = mask[..., None].astype(np.float32)
    if config.pooling == "cls":
        pooled = h[:, 0]
    elif config.pooling == "max":
        pooled = np.where(m > 0, h, -1e9).max(axis=1)
    else:
        pooled = (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    if config.normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)


async def encode(model: Model, batch: EncodedBatch, timeline: Timeline) -> np.ndarray:
    """Sentence embeddings (B, H), each block computed as soon as it has arrived.

    When every layer is already here (a cached model), the whole pass runs on one worker thread.
    """
    config = BertConfig.from_manifest(model.config)
    if len(model.manifest.layers) < config.num_hidden_layers + 1:
        raise RuntimeModelError("the model has fewer layers than its config says; re-convert it")
    mask_bias = ((1 - batch.attention_mask) * np.float32(-1e9)).astype(np.float32)[:, None, None, :]  # (B, 1, 1, T)

    vocab_size = model.manifest.tensor(WORD_EMBEDDINGS).shape[0]
    if batch.input_ids.size and (batch.input_ids.min() < 0 or batch.input_ids.max() >= vocab_size):
        raise RuntimeModelError(f"token ids must be in [0, {vocab_size})")
    word_rows = await timeline.rows(WORD_EMBEDDINGS, batch.input_ids)  # the rows this input needs, fetched first

    def step(layer: Layer, index: int, h: np.ndarray | None) -> np.ndarray:
        if index == 0:
            return embed_tokens(layer, word_rows, batch, config)
        assert h is not None
        return encoder_block(layer, h, mask_bias, index - 1, config)

    h = await timeline.compute_chain(range(config.num_hidden_layers + 1), step, None)
    return pool(h, batch.attention_mask, config)
