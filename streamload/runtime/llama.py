"""Llama-family decoder over streamed int8 layers: RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU, a KV cache, greedy and temperature/top-p sampling."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import RuntimeModelError
from ..formats.architectures import LLAMA
from ..layer import Layer
from . import ops
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model import Model


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None  # None, or llama3-style frequency scaling
    max_position_embeddings: int
    tie_word_embeddings: bool  # the head reuses the embedding table
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """The fields the decoder reads, checked and defaulted by the Llama family description.

        Raises:
            ManifestSchemaError: a field is missing, mistyped or out of range.
        """
        values = LLAMA.read_config(config)
        return cls(
            **{field.name: values[field.name] for field in dataclasses.fields(cls) if field.name != "eos_token_ids"},
            eos_token_ids=values["eos_token_id"],
        )


EMBED_TOKENS = "model.embed_tokens.weight"


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/d), with llama3 scaling when configured (as transformers computes it)."""
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim))
    scaling = config.rope_scaling
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
    """HF's rotate-half convention. x: (heads, T, d); cos, sin: (T, d)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@dataclasses.dataclass(slots=True)
class KVCache:
    keys: list[np.ndarray]  # per block: (kv_heads, capacity, d)
    values: list[np.ndarray]
    length: int = 0

    @classmethod
    def empty(cls, config: LlamaConfig, capacity: int) -> KVCache:
        shape = (config.num_key_value_heads, capacity, config.head_dim)
        return cls(
            [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)],
            [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)],
        )


class LlamaRunner:
    """Holds config, rotary tables and the KV cache for one generation."""

    def __init__(self, config: LlamaConfig, capacity: int) -> None:
        self.config = config
        self.capacity = capacity
        self.cache = KVCache.empty(config, capacity)
        freqs = np.outer(np.arange(capacity, dtype=np.float64), rope_inverse_frequencies(config))  # (capacity, d/2)
        angles = np.concatenate([freqs, freqs], axis=-1)
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def embed(self, rows: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
        """The tokens' rows of the embedding table (``Model.rows``) as float32: (T, H)."""
        return ops.embedding_rows(*rows)

    def block(self, layer: Layer, x: np.ndarray, index: int) -> np.ndarray:
        """One decoder block over the new tokens x (T, H), appending to the KV cache."""
        c = self.config
        p = f"model.layers.{index}."
        tokens = x.shape[0]
        start = self.cache.length
        positions = slice(start, start + tokens)

        def projections(*names: str) -> list[ops.Projection]:
            return [(*layer.weight(p + name + ".weight"), layer.tensors.get(p + name + ".bias")) for name in names]

        # one matmul per input (q, k, v stacked; gate and up stacked) on int8 tiles: float32 copies under the budget
        # made decode slower (4.25 against 5.20 tokens/s for 0.74 G weights, of which 512 MiB of copies hold a sixth:
        # `python tools/bench_runtime.py --only-large`) and cost that memory
        h = ops.rms_norm(x, layer[p + "input_layernorm.weight"], c.rms_norm_eps)
        qkv = ops.dense(
            h, projections("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), float_copies=False
        )  # (T, (heads + 2 kv) d)
        q_width, kv_width = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        q = qkv[:, :q_width].reshape(tokens, c.num_attention_heads, c.head_dim).transpose(1, 0, 2)  # (heads, T, d)
        k = qkv[:, q_width : q_width + kv_width].reshape(tokens, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)  # (kv, T, d)
        v = qkv[:, q_width + kv_width :].reshape(tokens, c.num_key_value_heads, c.head_dim).transpose(1, 0, 2)
        q = apply_rope(q, self.cos[positions], self.sin[positions])
        k = apply_rope(k, self.cos[positions], self.sin[positions])
        keys, values = self.cache.keys[index], self.cache.values[index]
        keys[:, positions] = k
        values[:, positions] = v
        total = start + tokens
        group = c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(c.num_key_value_heads, group * tokens, c.head_dim)  # heads sharing a kv head, stacked
        scores = q @ keys[:, :total].transpose(0, 2, 1) / np.float32(math.sqrt(c.head_dim))  # (kv, group*T, total)
        scores = scores.reshape(c.num_key_value_heads, group, tokens, total)
        causal = np.arange(total)[None, :] > (start + np.arange(tokens))[:, None]  # (T, total): future positions
        scores = np.where(causal, np.float32(-np.inf), scores)
        attention = ops.softmax(scores).reshape(c.num_key_value_heads, group * tokens, total)
        context = (attention @ values[:, :total]).reshape(c.num_attention_heads, tokens, c.head_dim)
        context = context.transpose(1, 0, 2).reshape(tokens, c.num_attention_heads * c.head_dim)
        x = x + ops.dense(context, projections("self_attn.o_proj"), float_copies=False)
        h = ops.rms_norm(x, layer[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        gate_up = ops.dense(h, projections("mlp.gate_proj", "mlp.up_proj"), float_copies=False)  # (T, 2 I)
        inner = gate_up.shape[1] // 2
        x = x + ops.dense(ops.silu(gate_up[:, :inner]) * gate_up[:, inner:], projections("mlp.down_proj"), float_copies=False)
        if index == c.num_hidden_layers - 1:
            self.cache.length = total
        return x

    def head(self, head_layer: Layer, table_layer: Layer | None, x: np.ndarray) -> np.ndarray:
        """Final norm and output projection: (T, H) -> (T, vocab) logits (a tied head reads the table's layer)."""
        h = ops.rms_norm(x, head_layer["model.norm.weight"], self.config.rms_norm_eps)
        if table_layer is not None:
            return ops.linear(h, *table_layer.weight(EMBED_TOKENS))
        return ops.linear(h, *head_layer.weight("lm_head.weight"))


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
    on_token: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill the prompt layer by layer as layers arrive, then decode from the memory map at full speed.

    ``on_token``: called on the decode thread with each generated token id as soon as it is sampled (the first too).
    """
    config = LlamaConfig.from_manifest(model.config)
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise RuntimeModelError("the prompt needs at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise RuntimeModelError(f"token ids must be in [0, {config.vocab_size})")
    capacity = min(config.max_position_embeddings, len(ids) + max_new_tokens)
    if len(ids) + max_new_tokens > config.max_position_embeddings:
        raise RuntimeModelError(f"prompt + new tokens exceed the model's {config.max_position_embeddings} positions")
    runner = LlamaRunner(config, capacity)
    prompt_rows = await timeline.rows(EMBED_TOKENS, ids)  # the prompt's rows of the table, fetched first
    _, x = await timeline.compute(0, lambda _layer, rows: runner.embed(rows), prompt_rows)
    blocks: list[Layer] = []
    for index in range(config.num_hidden_layers):
        layer, x = await timeline.compute(index + 1, runner.block, x, index)
        blocks.append(layer)
    last = config.num_hidden_layers + 1
    head_input = x if keep_prompt_logits else x[-1:]
    tied = config.tie_word_embeddings or "lm_head.weight" not in model.manifest.tensor_by_name
    table_layer = await model.layer(model.manifest.tensor(EMBED_TOKENS).layer_index) if tied else None  # the head is the table
    head_layer, logits = await timeline.compute(last, lambda layer, h: runner.head(layer, table_layer, h), head_input)
    rng = np.random.default_rng(seed)
    first = sample(logits[-1], temperature, top_p, rng)
    first_token_s = timeline.now_s()

    loop = asyncio.get_running_loop()

    def rows_of(token_id: int) -> tuple[np.ndarray, np.ndarray | None]:  # fetched on demand while the table streams in
        return asyncio.run_coroutine_threadsafe(model.rows(EMBED_TOKENS, np.array([token_id])), loop).result()

    def decode(first_id: int) -> list[int]:  # every step layer is here now: plain loop, off the event loop
        out = [first_id]
        if on_token is not None:
            on_token(first_id)
        with ops.decoding():  # large matrices cast on two threads, BLAS on one
            while len(out) < max_new_tokens and out[-1] not in config.eos_token_ids:
                h = runner.embed(rows_of(out[-1]))
                for index, layer in enumerate(blocks):
                    h = runner.block(layer, h, index)
                out.append(sample(runner.head(head_layer, table_layer, h)[-1], temperature, top_p, rng))
                if on_token is not None:
                    on_token(out[-1])
        return out

    generated = await asyncio.to_thread(decode, first) if max_new_tokens > 0 else []
    return Generation(
        generated_ids=generated,
        prompt_logits=logits if keep_prompt_logits else None,
        first_token_s=first_token_s,
        first_token_logits=np.asarray(logits[-1], dtype=np.float32),
    )
