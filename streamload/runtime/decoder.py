"""The decoder's math, one block at a time: its config, rotary positions, the KV cache and ``DecoderRunner``.

Llama and the families that differ from it in a few pieces (RMSNorm or LayerNorm, rotary or learned positions,
grouped-query attention with sliding windows and soft-capping, SwiGLU/GeGLU/GELU MLPs) share it: each family's
differences come from its description (``formats.architectures``: a ``DecoderLayout`` of tensor names and pieces, and
its config fields), read once into ``DecoderConfig``. The loop that drives it (prefill, decode) is ``generate.generate``.
Threads: none of its own; a ``DecoderRunner`` serves one generation, one call at a time, and owns what its matmuls use:
the buffer int8 tiles are cast into (``ops.CastTiles``) and, inside ``decoding``, the decode's two threads
(``ops.DecodeThreads``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import RuntimeModelError
from ..formats.architectures import LLAMA, DecoderLayout, architecture_named
from ..layer import Layer
from . import ops


@dataclasses.dataclass(frozen=True, slots=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention
    head_dim: int
    rms_norm_eps: float  # the eps of every norm (GPT-2: its LayerNorm's)
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # None, llama3-style frequency scaling, or longrope (short/long factors)
    max_position_embeddings: int
    tie_word_embeddings: bool  # the head reuses the embedding table
    eos_token_ids: tuple[int, ...]
    layout: DecoderLayout = LLAMA.decoder  # type: ignore[assignment]  # the family's tensor names and pieces
    partial_rotary_factor: float = 1.0  # the leading fraction of each head that rotates
    sliding_window: int | None = None  # a query attends to keys less than this many positions back
    layer_types: tuple[str, ...] | None = None  # per block: sliding_attention or full_attention (None: the window everywhere)
    query_pre_attn_scalar: float | None = None  # scores are divided by its square root (None: head_dim's)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None
    embedding_multiplier: float | None = None  # Granite: embeddings times this
    attention_multiplier: float | None = None  # Granite: scores times this instead of divided by sqrt(head_dim)
    residual_multiplier: float | None = None  # Granite: attention and MLP outputs times this before the residual add
    logits_scaling: float | None = None  # Granite: logits divided by this

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> DecoderConfig:
        """The fields the decoder reads, checked and defaulted by the family's description (Llama's without one).

        Raises:
            ManifestSchemaError: a field is missing, mistyped or out of range.
        """
        family = architecture_named(str(config.get("architecture", "llama")))
        if family is None or family.decoder is None:
            raise RuntimeModelError(f"{config.get('architecture')!r} is not a decoder family")
        values = family.read_config(config)
        names = {field.name for field in dataclasses.fields(cls)} - {
            "eos_token_ids",
            "layout",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
        }
        return cls(
            **{name: values[name] for name in names if name in values},
            rope_theta=values.get("rope_theta", LLAMA.default("rope_theta")),  # GPT-2: learned positions, no rotation
            rope_scaling=values.get("rope_scaling"),
            rms_norm_eps=values.get("rms_norm_eps", values.get("layer_norm_eps")),
            eos_token_ids=values["eos_token_id"],
            layout=family.decoder,
        )

    def window_of(self, index: int) -> int | None:
        """Block ``index``'s sliding window, or None for full attention."""
        if self.layer_types is not None and self.layer_types[index] != "sliding_attention":
            return None
        return self.sliding_window


LlamaConfig = DecoderConfig  # the name it had when Llama was the only decoder

EMBED_TOKENS = "model.embed_tokens.weight"


def rope_inverse_frequencies(config: DecoderConfig, *, long: bool = False) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/d) over the rotated dimensions d, with llama3 or longrope scaling when configured
    (as transformers computes it; longrope divides by its long factors when ``long``, else its short ones)."""
    dim = int(config.head_dim * config.partial_rotary_factor)
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type", scaling.get("type")) == "longrope":
        return inv_freq / np.asarray(scaling["long_factor" if long else "short_factor"], dtype=np.float64)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        original = float(scaling.get("original_max_position_embeddings", 8192))
        wavelength = 2 * math.pi / inv_freq
        smooth = (original / wavelength - low) / (high - low)
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        medium = (wavelength <= original / low) & (wavelength >= original / high)
        inv_freq = np.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """HF's rotate-half convention on the leading cos.shape[-1] dimensions. x: (heads, T, d); cos, sin: (T, r <= d)."""
    rotary = cos.shape[-1]
    if rotary < x.shape[-1]:  # partial rotary (Phi): the rest passes through
        return np.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _rotary_tables(config: DecoderConfig, capacity: int, *, long: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, (capacity, rotated dims) float32."""
    freqs = np.outer(np.arange(capacity, dtype=np.float64), rope_inverse_frequencies(config, long=long))  # (capacity, d/2)
    angles = np.concatenate([freqs, freqs], axis=-1)
    scaling = config.rope_scaling
    if scaling and scaling.get("rope_type") == "longrope":  # longrope also scales cos and sin
        attention = float(scaling["attention_factor"])
        return (np.cos(angles) * attention).astype(np.float32), (np.sin(angles) * attention).astype(np.float32)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


@dataclasses.dataclass(slots=True)
class KVCache:
    keys: list[np.ndarray]  # per block: (kv_heads, capacity, d)
    values: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, config: DecoderConfig, capacity: int) -> KVCache:
        shape = (config.num_key_value_heads, capacity, config.head_dim)
        return cls(
            [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)],
            [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)],
        )


class DecoderRunner:
    """Holds config, rotary tables and the KV cache for one generation; the family's layout picks its pieces."""

    def __init__(self, config: DecoderConfig, capacity: int) -> None:
        self.config = config
        self.capacity = capacity
        self.cache = KVCache.empty(config, capacity)
        self.embeddings: Layer | None = None  # layer 0, kept for a learned position table (GPT-2)
        self.rotary = config.layout.positions is None
        self.long_from: int | None = None  # longrope: from a call reaching past this many positions on, the long factors
        self.long = False  # the KV cache was computed with the long factors
        self.embedded: list[np.ndarray] = []  # longrope: every token's embedding so far, to recompute the cache at the switch
        self.tiles = ops.CastTiles()  # the float32 buffer this generation's int8 tiles are cast into
        self.split: ops.DecodeThreads | None = None  # inside ``decoding``: large matrices cast on two threads
        if self.rotary:
            self.cos, self.sin = _rotary_tables(config, capacity)
            scaling = config.rope_scaling
            if scaling and scaling.get("rope_type") == "longrope" and capacity > scaling["original_max_position_embeddings"]:
                self.long_from = int(scaling["original_max_position_embeddings"])
                self.cos_long, self.sin_long = _rotary_tables(config, capacity, long=True)

    @contextlib.contextmanager
    def decoding(self, threads: int = ops.DEFAULT_DECODE_THREADS) -> Iterator[None]:
        """Within the block (the decode loop), a large int8 matrix is cast and multiplied on ``threads`` threads (1 or 2),
        BLAS on one (``ops.DecodeThreads``: its helper thread ends with the block).

        Raises:
            UsageError: ``threads`` is not 1 or 2.
        """
        with ops.DecodeThreads(threads) as split:
            self.split = split
            try:
                yield
            finally:
                self.split = None

    def embed(self, rows: tuple[np.ndarray, np.ndarray | None], layer: Layer | None = None) -> np.ndarray:
        """The tokens' rows of the embedding table (``Model.rows``) as float32: (T, H); ``layer`` is layer 0, kept
        for the decode steps after the prompt's."""
        x = ops.embedding_rows(*rows)
        layout = self.config.layout
        if layout.embedding_scale:
            x *= np.float32(math.sqrt(self.config.hidden_size))
        if self.config.embedding_multiplier is not None:
            x *= np.float32(self.config.embedding_multiplier)
        if layout.positions is not None:
            self.embeddings = layer if layer is not None else self.embeddings
            if self.embeddings is None:
                raise RuntimeModelError("the position table (layer 0) is needed before the first token")
            start = self.cache.length
            x += ops.embedding(np.arange(start, start + x.shape[0]), *self.embeddings.weight(layout.positions))
        if self.long_from is not None and not self.long:
            self.embedded.append(x)
        return x

    def norm(self, layer: Layer, name: str, x: np.ndarray) -> np.ndarray:
        """The family's norm of x (T, H) with the weights named ``name`` (without .weight)."""
        kind, eps = self.config.layout.norm, self.config.rms_norm_eps
        if kind == "layer":
            return ops.layer_norm(x, layer[name + ".weight"], layer[name + ".bias"], eps)
        if kind == "rms_plus_one":
            return ops.rms_norm(x, 1.0 + layer[name + ".weight"], eps)
        return ops.rms_norm(x, layer[name + ".weight"], eps)

    def block(self, layer: Layer, x: np.ndarray, index: int) -> np.ndarray:
        """One decoder block over the new tokens x (T, H), appending to the KV cache."""
        lay = self.config.layout
        p = lay.block.format(i=index)
        if index == 0 and self.long_from is not None and not self.long and self.cache.length + x.shape[0] > self.long_from:
            x = self._switch_to_long_factors(x)
        start = self.cache.length
        # one matmul per input (q, k, v stacked; gate and up stacked) on int8 tiles: float32 copies under the budget
        # made decode slower (4.25 against 5.20 tokens/s for 0.74 G weights, of which 512 MiB of copies hold a sixth:
        # `python tools/bench_runtime.py --only-large`) and cost that memory
        h = x if lay.attention_norm is None else self.norm(layer, p + lay.attention_norm, x)
        x = self._add_residual(layer, p, lay.post_attention_norm, x, self._attention(layer, p, h, index, start))
        h = x if lay.mlp_norm is None else self.norm(layer, p + lay.mlp_norm, x)
        x = self._add_residual(layer, p, lay.post_mlp_norm, x, self._mlp(layer, p, h))
        if index == self.config.num_hidden_layers - 1:
            self.cache.length = start + x.shape[0]
        return x

    def _switch_to_long_factors(self, x: np.ndarray) -> np.ndarray:
        """longrope past its original length: the block input of this pass, which recomputes the cache from every token."""
        self.long = True  # as transformers' Phi-3 generation does: the cache computed again, every token with the long factors
        if self.cache.length:
            x, self.cache.length = np.concatenate(self.embedded), 0  # this pass's blocks and head see every token
        self.embedded.clear()
        return x

    def _dense(self, x: np.ndarray, projections: Sequence[ops.Projection]) -> np.ndarray:
        return ops.dense(x, projections, tiles=self.tiles, split=self.split)

    @staticmethod
    def _projections(layer: Layer, p: str, *names: str) -> list[ops.Projection]:
        return [(*layer.weight(p + name + ".weight"), layer.tensors.get(p + name + ".bias")) for name in names]

    def _add_residual(self, layer: Layer, p: str, post_norm: str | None, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """x plus a sublayer's output, after the family's post-norm and residual multiplier (Gemma 2, Granite)."""
        if post_norm is not None:
            out = self.norm(layer, p + post_norm, out)
        if self.config.residual_multiplier is not None:
            out = out * np.float32(self.config.residual_multiplier)
        return x + out

    def _attention(self, layer: Layer, p: str, h: np.ndarray, index: int, start: int) -> np.ndarray:
        """Self-attention of the normed new tokens h (T, H) at positions start..., their keys and values cached: (T, H)."""
        c = self.config
        tokens = h.shape[0]
        q, k, v = self._query_key_value(layer, p, h, slice(start, start + tokens))
        keys, values = self.cache.keys[index], self.cache.values[index]
        keys[:, start : start + tokens] = k
        values[:, start : start + tokens] = v
        total = start + tokens
        group = c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(c.num_key_value_heads, group * tokens, c.head_dim)  # heads sharing a kv head, stacked
        scale = c.head_dim if c.query_pre_attn_scalar is None else c.query_pre_attn_scalar
        if c.attention_multiplier is None:
            scores = q @ keys[:, :total].transpose(0, 2, 1) / np.float32(math.sqrt(scale))  # (kv, group*T, total)
        else:
            scores = q @ keys[:, :total].transpose(0, 2, 1) * np.float32(c.attention_multiplier)
        if c.attn_logit_softcapping is not None:
            cap = np.float32(c.attn_logit_softcapping)
            scores = np.tanh(scores / cap) * cap
        scores = scores.reshape(c.num_key_value_heads, group, tokens, total)
        queries = (start + np.arange(tokens))[:, None]
        causal = np.arange(total)[None, :] > queries  # (T, total): future positions
        window = c.window_of(index)
        if window is not None:
            causal |= np.arange(total)[None, :] <= queries - window  # and those the window left behind
        scores = np.where(causal, np.float32(-np.inf), scores)
        attention = ops.softmax(scores).reshape(c.num_key_value_heads, group * tokens, total)
        context = (attention @ values[:, :total]).reshape(c.num_attention_heads, tokens, c.head_dim)
        context = context.transpose(1, 0, 2).reshape(tokens, c.num_attention_heads * c.head_dim)
        return self._dense(context, self._projections(layer, p, c.layout.output))

    def _query_key_value(self, layer: Layer, p: str, h: np.ndarray, positions: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q (heads, T, d), k and v (kv, T, d) of h (T, H): one matmul, the family's q/k norms, then rotation."""
        c = self.config
        lay = c.layout
        tokens = h.shape[0]
        qkv = self._dense(h, self._projections(layer, p, *lay.qkv))  # (T, (heads + 2 kv) d)
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        if lay.q_norm is not None and lay.k_norm is not None and not lay.qk_norm_per_head:  # across heads (OLMo 2)
            qkv = qkv.copy()
            qkv[:, :q_width] = ops.rms_norm(qkv[:, :q_width], layer[p + lay.q_norm + ".weight"], c.rms_norm_eps)
            qkv[:, q_width : q_width + kv_width] = ops.rms_norm(
                qkv[:, q_width : q_width + kv_width], layer[p + lay.k_norm + ".weight"], c.rms_norm_eps
            )
        q = qkv[:, :q_width].reshape(tokens, c.num_attention_heads, c.head_dim).transpose(1, 0, 2)  # (heads, T, d)
        k = qkv[:, q_width : q_width + kv_width].reshape(tokens, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)  # (kv, T, d)
        v = qkv[:, q_width + kv_width :].reshape(tokens, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)
        if lay.q_norm is not None and lay.k_norm is not None and lay.qk_norm_per_head:  # per head, before rotation (Qwen3)
            q = ops.rms_norm(q, layer[p + lay.q_norm + ".weight"], c.rms_norm_eps)
            k = ops.rms_norm(k, layer[p + lay.k_norm + ".weight"], c.rms_norm_eps)
        if self.rotary:
            cos, sin = (self.cos_long, self.sin_long) if self.long else (self.cos, self.sin)
            q = apply_rope(q, cos[positions], sin[positions])
            k = apply_rope(k, cos[positions], sin[positions])
        return q, k, v

    def _mlp(self, layer: Layer, p: str, h: np.ndarray) -> np.ndarray:
        """The MLP of the normed tokens h (T, H): gated (gate and up in one matmul) or not, then down: (T, H)."""
        lay = self.config.layout
        up = self._dense(h, self._projections(layer, p, *lay.up))  # (T, 2 I) gate and up, or (T, I)
        act = ops.silu if lay.activation == "silu" else ops.gelu_tanh
        if lay.gated:
            inner = up.shape[1] // 2
            up = act(up[:, :inner]) * up[:, inner:]
        else:
            up = act(up)
        return self._dense(up, self._projections(layer, p, lay.down))

    def head(self, head_layer: Layer, table_layer: Layer | None, x: np.ndarray) -> np.ndarray:
        """Final norm and output projection: (T, H) -> (T, vocab) logits (a tied head reads the table's layer)."""
        return self.finish_logits(self.project(self.final_norm(head_layer, x), *self.head_weight(head_layer, table_layer)))

    def final_norm(self, head_layer: Layer, x: np.ndarray) -> np.ndarray:
        return self.norm(head_layer, self.config.layout.final_norm, x)

    def head_weight(self, head_layer: Layer, table_layer: Layer | None) -> tuple[np.ndarray, np.ndarray | None]:
        """The head's matrix and per-row scales: the token table's when tied (``table_layer``), else ``lm_head``'s."""
        return (table_layer or head_layer).weight(self.head_matrix(table_layer is not None))

    def head_matrix(self, tied: bool) -> str:
        lay = self.config.layout
        return lay.embed_tokens if tied else lay.lm_head

    def project(self, h: np.ndarray, weight: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        """The output projection of normed states h (T, H) onto ``weight``'s rows (all of the head, or some): (T, rows)."""
        return ops.linear(h, weight, scales, tiles=self.tiles, split=self.split)

    def finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """The family's last touches on the logits: Granite's scaling, Gemma 2's soft-capping."""
        if self.config.logits_scaling is not None:
            logits = logits / np.float32(self.config.logits_scaling)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = np.tanh(logits / np.float32(cap)) * np.float32(cap)
        return logits


LlamaRunner = DecoderRunner
