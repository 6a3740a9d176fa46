"""The decoder over streamed int8 layers: Llama and the families that differ from it in a few pieces (RMSNorm
or LayerNorm, rotary or learned positions, grouped-query attention with sliding windows and soft-capping,
SwiGLU/GeGLU/GELU MLPs), with a KV cache and greedy or temperature/top-p sampling.

Each family's differences come from its description (``formats.architectures``: a ``DecoderLayout`` of tensor
names and pieces, and its config fields), read once into ``DecoderConfig``; ``generate`` is the same for all.
Threads: ``generate`` runs each layer's compute on a worker thread as it arrives, then the decode loop on one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RuntimeModelError
from ..formats.architectures import LLAMA, DecoderLayout, architecture_named
from ..layer import Layer
from . import ops
from .memory import MemoryBudget, map_large_allocations, plan_residency, process_anonymous_bytes, release_freed_memory
from .residency import DecodeWeights, decoder_segments
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model import Model

log = logging.getLogger(__name__)


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
        if self.rotary:
            self.cos, self.sin = _rotary_tables(config, capacity)
            scaling = config.rope_scaling
            if scaling and scaling.get("rope_type") == "longrope" and capacity > scaling["original_max_position_embeddings"]:
                self.long_from = int(scaling["original_max_position_embeddings"])
                self.cos_long, self.sin_long = _rotary_tables(config, capacity, long=True)

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
        c = self.config
        lay = c.layout
        p = lay.block.format(i=index)
        if index == 0 and self.long_from is not None and not self.long and self.cache.length + x.shape[0] > self.long_from:
            self.long = True  # as transformers' Phi-3 generation does: the cache computed again, every token with the long factors
            if self.cache.length:
                x, self.cache.length = np.concatenate(self.embedded), 0  # this pass's blocks and head see every token
            self.embedded.clear()
        tokens = x.shape[0]
        start = self.cache.length
        positions = slice(start, start + tokens)

        def projections(*names: str) -> list[ops.Projection]:
            return [(*layer.weight(p + name + ".weight"), layer.tensors.get(p + name + ".bias")) for name in names]

        # one matmul per input (q, k, v stacked; gate and up stacked) on int8 tiles: float32 copies under the budget
        # made decode slower (4.25 against 5.20 tokens/s for 0.74 G weights, of which 512 MiB of copies hold a sixth:
        # `python tools/bench_runtime.py --only-large`) and cost that memory
        h = x if lay.attention_norm is None else self.norm(layer, p + lay.attention_norm, x)
        qkv = ops.dense(h, projections(*lay.qkv))  # (T, (heads + 2 kv) d)
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
        keys, values = self.cache.keys[index], self.cache.values[index]
        keys[:, positions] = k
        values[:, positions] = v
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
        attended = ops.dense(context, projections(lay.output))
        if lay.post_attention_norm is not None:
            attended = self.norm(layer, p + lay.post_attention_norm, attended)
        if c.residual_multiplier is not None:
            attended = attended * np.float32(c.residual_multiplier)
        x = x + attended
        h = x if lay.mlp_norm is None else self.norm(layer, p + lay.mlp_norm, x)
        up = ops.dense(h, projections(*lay.up))  # (T, 2 I) gate and up, or (T, I)
        act = ops.silu if lay.activation == "silu" else ops.gelu_tanh
        if lay.gated:
            inner = up.shape[1] // 2
            up = act(up[:, :inner]) * up[:, inner:]
        else:
            up = act(up)
        mlp = ops.dense(up, projections(lay.down))
        if lay.post_mlp_norm is not None:
            mlp = self.norm(layer, p + lay.post_mlp_norm, mlp)
        if c.residual_multiplier is not None:
            mlp = mlp * np.float32(c.residual_multiplier)
        x = x + mlp
        if index == c.num_hidden_layers - 1:
            self.cache.length = total
        return x

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
        return ops.linear(h, weight, scales)

    def finish_logits(self, logits: np.ndarray) -> np.ndarray:
        """The family's last touches on the logits: Granite's scaling, Gemma 2's soft-capping."""
        if self.config.logits_scaling is not None:
            logits = logits / np.float32(self.config.logits_scaling)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = np.tanh(logits / np.float32(cap)) * np.float32(cap)
        return logits


LlamaRunner = DecoderRunner


class DecoderWeights(DecodeWeights):
    """``DecodeWeights`` with what the head needs beside its matrix: the final norm's small tensors and the matrix's
    per-row scales (copies, so nothing of the head layer's memory map stays in use under a budget)."""

    small_head: Layer
    head_scales: np.ndarray | None


def decode_weights(
    model: Model,
    runner: DecoderRunner,
    blocks: list[Layer],
    head_layer: Layer,
    table_layer: Layer | None,
    budget: MemoryBudget | None,
    decodes: bool,
) -> DecoderWeights:
    """The weights decode reads, planned under ``budget`` (None: all mapped, as the prefill left them).

    Raises:
        MemoryBudgetError: the budget cannot hold one decode step; the message names the minimum.
    """
    config = runner.config
    manifest = model.manifest
    tied = table_layer is not None
    head_name = runner.head_matrix(tied)
    matrix, scales = (table_layer or head_layer).weight(head_name)
    segments = decoder_segments(manifest, config.num_hidden_layers, head_name)
    small = {name: np.array(array) for name, array in head_layer.tensors.items() if name != head_name and array.nbytes < (64 << 20)}
    plan = None
    if budget is not None and decodes:
        release_freed_memory()  # the prefill's freed temporaries: what the process holds is then what it uses
        plan = plan_residency(budget, segments, fixed_costs=_fixed_costs(runner, blocks[0], small, scales))
        log.info("%s", plan.describe())
        if not plan.all_resident:
            model.drop_cached_pages()  # the prefill's pages of the store: the plan's copies and reads replace them
    weights = DecoderWeights(manifest, model.store_path, segments, plan, head_matrix=head_name, mapped_blocks=blocks, mapped_head=matrix)
    mapped = weights.mapped
    weights.small_head = head_layer if mapped else dataclasses.replace(head_layer, tensors=small, quant={}, borrowed={})
    weights.head_scales = scales if mapped or scales is None else np.array(scales)
    return weights


def _close_made_weights(planning: asyncio.Future[DecoderWeights]) -> None:
    if not planning.cancelled() and planning.exception() is None:
        planning.result().close()


def _fixed_costs(runner: DecoderRunner, block: Layer, small_head: Mapping[str, np.ndarray], scales: np.ndarray | None) -> dict[str, int]:
    """What a decode step holds beside the weights of its blocks and head matrix (module doc of ``memory``)."""
    c = runner.config
    kv_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * runner.capacity * c.head_dim * 4
    intermediate = max(max(a.shape[0] for a in block.tensors.values()), c.hidden_size)  # the widest projection's outputs
    activations = 4 * (16 * c.hidden_size + 4 * intermediate + 3 * c.vocab_size) + 2 * 4 * ops.PARALLEL_TILE_ELEMENTS
    head = sum(a.nbytes for a in small_head.values()) + (0 if scales is None else scales.nbytes)
    return {"process": process_anonymous_bytes(), "kv_cache": kv_cache, "activations": activations, "head_small": head}


def _token_rows(model: Model, table_name: str, loop: asyncio.AbstractEventLoop) -> Callable[[int], tuple[np.ndarray, np.ndarray | None]]:
    """A decode step's embedding rows: from the table's memory map once the table is whole (no trip to the event loop
    per token), fetched on demand through the loop while it is still streaming in."""
    index = model.manifest.tensor(table_name).layer_index
    table: list[tuple[np.ndarray, np.ndarray | None]] = []

    def rows_of(token_id: int) -> tuple[np.ndarray, np.ndarray | None]:
        if not table and model.layer_ready_s[index] is not None:
            table.append(asyncio.run_coroutine_threadsafe(model.layer(index), loop).result().weight(table_name))
        if table:
            values, scales = table[0]
            return values[[token_id]], None if scales is None else scales[[token_id]]
        return asyncio.run_coroutine_threadsafe(model.rows(table_name, np.array([token_id])), loop).result()

    return rows_of


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy when temperature is 0; otherwise softmax(logits / T) restricted to the top-p nucleus."""
    if temperature <= 0:
        return int(np.argmax(logits))
    probs = ops.softmax((logits / temperature).astype(np.float64))
    order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p) + 1)]
    kept = probs[keep] / probs[keep].sum()
    return int(rng.choice(keep, p=kept))


@dataclasses.dataclass(frozen=True, slots=True)
class Generation:
    generated_ids: list[int]
    prompt_logits: np.ndarray | None  # (T, vocab) when asked for
    first_token_s: float  # seconds from the run's start to the first generated token
    first_token_logits: np.ndarray | None = None  # (vocab,) float32: the logits the first token was sampled from
    token_times_s: list[float] = dataclasses.field(default_factory=list)  # per generated token, when it was there (run's clock)


async def generate(
    model: Model,
    prompt_ids: Sequence[int],
    timeline: Timeline,
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    keep_prompt_logits: bool = False,
    memory_budget: MemoryBudget | None = None,
    decode_threads: int = ops.DEFAULT_DECODE_THREADS,
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill the prompt layer by layer as layers arrive, then decode: from the memory map at full speed, or under
    ``memory_budget`` from resident copies and segments read from the store on every token (``residency``).

    ``on_token``: called on the decode thread with each generated token id as soon as it is sampled (the first too).
    """
    config = DecoderConfig.from_manifest(model.config)
    table = config.layout.embed_tokens  # the token table: its rows are fetched first
    if memory_budget is not None:
        map_large_allocations()  # the prefill's temporaries go back to the system when freed
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise RuntimeModelError("the prompt needs at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise RuntimeModelError(f"token ids must be in [0, {config.vocab_size})")
    capacity = min(config.max_position_embeddings, len(ids) + max_new_tokens)
    if len(ids) + max_new_tokens > config.max_position_embeddings:
        raise RuntimeModelError(f"prompt + new tokens exceed the model's {config.max_position_embeddings} positions")
    runner = DecoderRunner(config, capacity)
    prompt_rows = await timeline.rows(table, ids)  # the prompt's rows of the table, fetched first
    _, x = await timeline.compute(0, lambda layer, rows: runner.embed(rows, layer), prompt_rows)  # layer 0: positions (GPT-2)
    blocks: list[Layer] = []
    for index in range(config.num_hidden_layers):
        layer, x = await timeline.compute(index + 1, runner.block, x, index)
        blocks.append(layer)
    last = config.num_hidden_layers + 1
    head_input = x if keep_prompt_logits else x[-1:]
    tied = config.tie_word_embeddings or config.layout.lm_head not in model.manifest.tensor_by_name
    table_layer = await model.layer(model.manifest.tensor(table).layer_index) if tied else None  # the head is the table
    head_layer, logits = await timeline.compute(last, lambda layer, h: runner.head(layer, table_layer, h), head_input)
    rng = np.random.default_rng(seed)
    first = sample(logits[-1], temperature, top_p, rng)
    first_token_s = timeline.now_s()

    planning = asyncio.ensure_future(
        asyncio.to_thread(decode_weights, model, runner, blocks, head_layer, table_layer, memory_budget, max_new_tokens > 1)
    )
    try:
        weights = await asyncio.shield(planning)
    except asyncio.CancelledError:  # the thread still makes them: close them (the reader thread, the store, the ring) then
        planning.add_done_callback(_close_made_weights)
        raise
    rows_of = _token_rows(model, table, asyncio.get_running_loop())

    token_times_s = [first_token_s]

    def decode(first_id: int) -> list[int]:  # every step layer is here now: plain loop, off the event loop
        out = [first_id]
        small_head = weights.small_head
        scales = weights.head_scales
        try:
            if on_token is not None:
                on_token(first_id)
            with ops.decoding(decode_threads):  # large matrices cast on two threads, BLAS on one
                while len(out) < max_new_tokens and out[-1] not in config.eos_token_ids and not stopped.is_set():
                    h = runner.embed(rows_of(out[-1]))
                    for index in range(config.num_hidden_layers):
                        h = runner.block(weights.block(index), h, index)
                        weights.done(index)
                    normed = runner.final_norm(small_head, h)

                    def project(rows: np.ndarray, part: slice, normed: np.ndarray = normed) -> np.ndarray:
                        return runner.project(normed, rows, None if scales is None else scales[part])

                    logits = runner.finish_logits(weights.head_logits(project))
                    out.append(sample(logits[-1], temperature, top_p, rng))
                    token_times_s.append(timeline.now_s())
                    if on_token is not None:
                        on_token(out[-1])
        finally:
            weights.close()
        return out

    stopped = threading.Event()  # the run was cancelled (Ctrl-C, a consumer that left): decode stops after this token
    generated: list[int] = []
    if max_new_tokens > 0:
        decoding = asyncio.ensure_future(asyncio.to_thread(decode, first))
        try:  # shielded: a decode cancelled before its thread started would never close its weights
            generated = await asyncio.shield(decoding)
        except asyncio.CancelledError:
            stopped.set()
            raise
    return Generation(
        generated_ids=generated,
        prompt_logits=logits if keep_prompt_logits else None,
        first_token_s=first_token_s,
        first_token_logits=np.asarray(logits[-1], dtype=np.float32),
        token_times_s=token_times_s[: len(generated)],
    )
