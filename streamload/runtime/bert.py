"""BERT encoder (sentence embeddings, as sentence-transformers computes them) over streamed int8 layers."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NoTokenizerError, RuntimeModelError
from ..formats.architectures import BERT
from ..layer import Layer
from ..tokenizer import NO_TOKENIZER
from . import ops
from .memory import MemoryBudget, plan_single_pass, process_anonymous_bytes
from .ops import default_float_weight_budget_bytes
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
        raise NoTokenizerError(NO_TOKENIZER)
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


def padded_columns(tokens: int) -> int:
    """How many columns to give the block's matmuls for ``tokens`` tokens: OpenBLAS's sgemm (Haswell kernel) runs
    ``W @ x`` eight columns at a time and a remainder of 3, 5, 6 or 7 costs more than padding it with zero columns
    (MiniLM's shapes: 19 tokens take 0.94x as long as 19 padded to 20, 13 and 21-23 padded to 16 and 24 0.4-0.9x)."""
    rest = tokens % 8
    if rest >= 5:
        return tokens + 8 - rest
    return tokens + 1 if rest == 3 else tokens


def token_columns(h: np.ndarray) -> np.ndarray:
    """(B, T, H) -> (H, B*T + padding): tokens as columns, zero-padded to ``padded_columns``; the blocks keep the
    padding (each column is computed on its own and no attention score reads a padding column), sliced off at the end."""
    tokens = h.shape[0] * h.shape[1]
    ht = np.zeros((h.shape[-1], padded_columns(tokens)), dtype=np.float32)
    ht[:, :tokens] = h.reshape(-1, h.shape[-1]).T
    return ht


def encoder_block(
    layer: Layer,
    ht: np.ndarray,
    mask_bias: np.ndarray | None,
    block: int,
    config: BertConfig,
    batch_shape: tuple[int, int],
    float_weights: ops.FloatWeightCache | None = None,
    tiles: ops.CastTiles | None = None,
) -> np.ndarray:
    """One transformer block, post-norm as in BERT, with tokens as columns: ht (H, B*T + padding) -> the same shape.

    Tokens as columns let every projection be ``weight @ ht`` (``ops.dense_t``), which OpenBLAS runs faster than
    ``x @ weight.T`` for the few tokens of one sentence. Query, key and value are one matmul (on float32 weight
    copies when the budget allows), 1/sqrt(head_dim) is folded into the query's scales, attention is batched
    over sentences and heads and writes its context straight into the columns of the next matmul, and the norms
    and GELU work in place. The matmuls run on ``padded_columns`` columns (zeros past the tokens, which no
    attention score reads); ``mask_bias`` is None when no token is padding. ``tiles``: the pass's cast buffer for int8
    weights (None: one for this block).
    """
    tiles = tiles or ops.CastTiles()
    p = f"encoder.layer.{block}."
    hidden = ht.shape[0]
    batch, length = batch_shape
    tokens = batch * length
    heads = config.num_attention_heads
    head_dim = hidden // heads

    def projection(name: str, factor: float | None = None) -> ops.Projection:
        weight, scales = _weight(layer, p + name + ".weight")
        bias = layer[p + name + ".bias"]
        if factor is not None:  # the same factor on every call: a FloatWeightCache keys copies by the weight alone
            scales = scales * np.float32(factor) if scales is not None else None
            bias = bias * np.float32(factor)
            if scales is None:
                weight = weight * np.float32(factor)
        return weight, scales, bias

    xt, columns = ht, ht.shape[1]
    query = projection("attention.self.query", 1.0 / math.sqrt(head_dim))
    qkv = ops.dense_t(
        xt, [query, projection("attention.self.key"), projection("attention.self.value")], float_weights=float_weights, tiles=tiles
    )  # (3H, columns)
    qkv = qkv[:, :tokens].reshape(3, heads, head_dim, batch, length)  # a view
    q = qkv[0].transpose(2, 0, 3, 1)  # (B, heads, T, d)
    k = qkv[1].transpose(2, 0, 1, 3)  # (B, heads, d, T)
    v = qkv[2].transpose(2, 0, 1, 3)  # (B, heads, d, T)
    scores = q @ k  # (B, heads, T queries, T keys), already scaled
    if mask_bias is not None:
        scores += mask_bias
    probabilities = ops.softmax(scores, out=scores)
    context_t = np.empty((hidden, columns), dtype=np.float32)
    context_t[:, tokens:] = 0  # the padding columns: zeros in, finite out (no attention reads them)
    target = context_t[:, :tokens].reshape(heads, head_dim, batch, length).transpose(2, 0, 1, 3)  # (B, heads, d, T) view
    np.matmul(v, probabilities.transpose(0, 1, 3, 2), out=target)  # context^T per sentence and head, in place
    attended = ops.dense_t(context_t, [projection("attention.output.dense")], float_weights=float_weights, tiles=tiles)
    attended += xt
    ops.layer_norm_t(
        attended,
        layer[p + "attention.output.LayerNorm.weight"],
        layer[p + "attention.output.LayerNorm.bias"],
        config.layer_norm_eps,
        out=attended,
    )
    inner = ops.dense_t(attended, [projection("intermediate.dense")], float_weights=float_weights, tiles=tiles)  # (I, columns)
    if config.hidden_act.startswith("gelu"):  # tanh form for the exact "gelu" too: cosine to PyTorch unchanged to 1e-4
        ops.gelu_tanh(inner, out=inner)
    else:
        np.maximum(inner, 0, out=inner)
    out = ops.dense_t(inner, [projection("output.dense")], float_weights=float_weights, tiles=tiles)
    out += attended
    ops.layer_norm_t(out, layer[p + "output.LayerNorm.weight"], layer[p + "output.LayerNorm.bias"], config.layer_norm_eps, out=out)
    return out


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


async def encode(
    model: Model,
    batch: EncodedBatch,
    timeline: Timeline,
    *,
    float_weights: ops.FloatWeightCache | None = None,
    memory_budget: MemoryBudget | None = None,
) -> np.ndarray:
    """Sentence embeddings (B, H), each block computed as soon as it has arrived.

    When every layer is already here (a cached model), the whole pass runs on one worker thread. Under a
    ``memory_budget`` the layers stay mapped (with float32 copies in the room left) when they fit; otherwise each layer's
    pages are dropped after its compute and no copies are made: one pass reads each layer once, so nothing thrashes.

    Raises:
        MemoryBudgetError: the budget cannot hold the largest layer beside the batch's activations.
    """
    config = BertConfig.from_manifest(model.config)
    if len(model.manifest.layers) < config.num_hidden_layers + 1:
        raise RuntimeModelError("the model has fewer layers than its config says; re-convert it")
    batch_shape = batch.input_ids.shape
    padded = not batch.attention_mask.all()
    mask_bias = ((1 - batch.attention_mask) * np.float32(-1e9)).astype(np.float32)[:, None, None, :] if padded else None  # (B, 1, 1, T)

    vocab_size = model.manifest.tensor(WORD_EMBEDDINGS).shape[0]
    if batch.input_ids.size and (batch.input_ids.min() < 0 or batch.input_ids.max() >= vocab_size):
        raise RuntimeModelError(f"token ids must be in [0, {vocab_size})")
    steps = range(config.num_hidden_layers + 1)
    drop_after_use = False
    if memory_budget is not None:
        plan = plan_single_pass(
            memory_budget,
            [model.manifest.layers[i].raw_size_bytes for i in steps],
            fixed_costs={"process": process_anonymous_bytes(), "activations": _activation_bytes(model.config, config, batch_shape)},
            float_weight_cap=default_float_weight_budget_bytes(),
        )
        drop_after_use = plan.drop_after_use
        if drop_after_use:
            budget_mib = memory_budget.total_bytes >> 20
            logger.info("memory budget %d MiB (%s): the model does not fit; one layer at a time", budget_mib, memory_budget.source)
        if float_weights is not None and float_weights.budget_bytes > plan.float_weight_bytes:
            float_weights.set_budget(plan.float_weight_bytes)
    word_rows = await timeline.rows(WORD_EMBEDDINGS, batch.input_ids)  # the rows this input needs, fetched first

    tokens = batch_shape[0] * batch_shape[1]
    tiles = ops.CastTiles()  # this pass's cast buffer, one thread at a time (the steps run in order)

    def step(layer: Layer, index: int, ht: np.ndarray | None) -> np.ndarray:
        if index == 0:
            out = token_columns(embed_tokens(layer, word_rows, batch, config))  # (H, B*T + padding)
        else:
            assert ht is not None
            out = encoder_block(layer, ht, mask_bias, index - 1, config, batch_shape, float_weights, tiles)
        if drop_after_use:
            model.drop_cached_pages(index)  # one pass: this layer is not read again until the next batch
        return out

    ht = await timeline.compute_chain(steps, step, None)
    h = ht[:, :tokens].T.reshape(*batch_shape, ht.shape[0])  # (B, T, H)
    return pool(h, batch.attention_mask, config)


def _activation_bytes(fields: Mapping[str, Any], config: BertConfig, batch_shape: tuple[int, int]) -> int:
    """A block's float32 temporaries for a batch: states, q/k/v, the attention scores, the intermediate layer."""
    batch, length = batch_shape
    tokens = batch * length
    intermediate = int(fields.get("intermediate_size", 4 * config.hidden_size))
    states = tokens * (8 * config.hidden_size + 2 * intermediate)
    scores = batch * config.num_attention_heads * length * length
    return 4 * (states + 2 * scores)
