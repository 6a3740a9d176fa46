"""Generation with a decoder over streamed int8 layers: prefill the prompt as layers arrive, then the decode loop.

The loop samples each token (greedy or temperature/top-p), times it, stops on an end token, on ``max_new_tokens`` or
when the run is cancelled, and before it starts plans, under a memory budget, which weights stay resident and which are
read from the store on every token (``memory``, ``residency``). The math of one block is ``decoder.DecoderRunner``;
``generate`` is the same for every family.
Threads: ``generate`` runs each layer's compute on a worker thread as it arrives, plans the decode weights on one,
then runs the decode loop on one (``DecoderRunner.decoding`` adds a helper for large matrices, ended with the loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import RuntimeModelError
from ..layer import Layer
from . import ops
from .decoder import DecoderConfig, DecoderRunner
from .memory import MemoryBudget, map_large_allocations, plan_residency, process_anonymous_bytes, release_freed_memory
from .residency import DecodeWeights, decoder_segments
from .timeline import Timeline

if TYPE_CHECKING:
    from ..model import Model

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Generation:
    generated_ids: list[int]
    prompt_logits: np.ndarray | None  # (T, vocab) when asked for
    first_token_s: float  # seconds from the run's start to the first generated token
    first_token_logits: np.ndarray | None = None  # (vocab,) float32: the logits the first token was sampled from
    token_times_s: list[float] = dataclasses.field(default_factory=list)  # per generated token, when it was there (run's clock)


@dataclasses.dataclass(frozen=True, slots=True)
class Prefill:
    """What the prompt's pass leaves for the decode: the layers it read and its logits."""

    blocks: list[Layer]  # block i is layer i + 1
    head_layer: Layer
    table_layer: Layer | None  # the token table's layer when the head is tied to it, else None
    logits: np.ndarray  # (T, vocab) when the prompt's logits are kept, else (1, vocab): the last token's


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
    if memory_budget is not None:
        map_large_allocations()  # a process-level switch, left on: the prefill's temporaries go back to the system when freed
    ids = _check_prompt(prompt_ids, config, max_new_tokens)
    runner = DecoderRunner(config, min(config.max_position_embeddings, len(ids) + max_new_tokens))
    prefill = await _prefill(model, runner, ids, timeline, keep_prompt_logits)
    logits = prefill.logits
    rng = np.random.default_rng(seed)
    first = sample(logits[-1], temperature, top_p, rng)
    first_token_s = timeline.now_s()

    planning = asyncio.ensure_future(asyncio.to_thread(decode_weights, model, runner, prefill, memory_budget, max_new_tokens > 1))
    # the thread still makes them when cancelled: close them (the reader thread, the store, the ring) then
    weights = await _shielded(planning, lambda: planning.add_done_callback(_close_made_weights))
    rows_of = _token_rows(model, config.layout.embed_tokens, asyncio.get_running_loop())
    token_times_s = [first_token_s]
    generated: list[int] = []
    if max_new_tokens > 0:
        stopped = threading.Event()  # the run was cancelled (Ctrl-C, a consumer that left): decode stops after this token
        decode = functools.partial(
            decode_tokens,
            runner,
            weights,
            rows_of,
            first,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            rng=rng,
            decode_threads=decode_threads,
            stopped=stopped,
            on_token=on_token,
            token_times_s=token_times_s,
            clock=timeline.now_s,
        )
        generated = await _shielded(asyncio.ensure_future(asyncio.to_thread(decode)), stopped.set)
    return Generation(
        generated_ids=generated,
        prompt_logits=logits if keep_prompt_logits else None,
        first_token_s=first_token_s,
        first_token_logits=np.asarray(logits[-1], dtype=np.float32),
        token_times_s=token_times_s[: len(generated)],
    )


def _check_prompt(prompt_ids: Sequence[int], config: DecoderConfig, max_new_tokens: int) -> np.ndarray:
    """The prompt as (T,) int64 ids, checked against the vocabulary and the model's positions."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    if ids.ndim != 1 or len(ids) == 0:
        raise RuntimeModelError("the prompt needs at least one token")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise RuntimeModelError(f"token ids must be in [0, {config.vocab_size})")
    if len(ids) + max_new_tokens > config.max_position_embeddings:
        raise RuntimeModelError(f"prompt + new tokens exceed the model's {config.max_position_embeddings} positions")
    return ids


async def _prefill(model: Model, runner: DecoderRunner, ids: np.ndarray, timeline: Timeline, keep_prompt_logits: bool) -> Prefill:
    """The prompt through every layer, each as soon as it has arrived, on a worker thread (``Timeline.compute``)."""
    config = runner.config
    table = config.layout.embed_tokens  # the token table: its rows are fetched first
    prompt_rows = await timeline.rows(table, ids)  # the prompt's rows of the table, fetched first
    _, x = await timeline.compute(0, lambda layer, rows: runner.embed(rows, layer), prompt_rows)  # layer 0: positions (GPT-2)
    blocks: list[Layer] = []
    for index in range(config.num_hidden_layers):
        layer, x = await timeline.compute(index + 1, runner.block, x, index)
        blocks.append(layer)
    head_input = x if keep_prompt_logits else x[-1:]
    tied = config.tie_word_embeddings or config.layout.lm_head not in model.manifest.tensor_by_name
    table_layer = await model.layer(model.manifest.tensor(table).layer_index) if tied else None  # the head is the table
    head_layer, logits = await timeline.compute(
        config.num_hidden_layers + 1, lambda layer, h: runner.head(layer, table_layer, h), head_input
    )
    return Prefill(blocks, head_layer, table_layer, logits)


class StepWeights(DecodeWeights):
    """All one decode step reads: the blocks and the head's matrix (``DecodeWeights``), and what the head needs beside
    its matrix, ``small_head`` (the final norm's small tensors) and ``head_scales`` (the matrix's per-row scales):
    copies when the plan does not read the memory map, so nothing of the head layer's map stays in use under a budget.
    """

    def __init__(self, *args: Any, small_head: Layer, head_scales: np.ndarray | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.small_head = small_head
        self.head_scales = head_scales


def decode_weights(
    model: Model,
    runner: DecoderRunner,
    prefill: Prefill,
    budget: MemoryBudget | None,
    decodes: bool,
) -> StepWeights:
    """The weights decode reads, planned under ``budget`` (None: all mapped, as the prefill left them).

    Raises:
        MemoryBudgetError: the budget cannot hold one decode step; the message names the minimum.
    """
    config = runner.config
    manifest = model.manifest
    blocks, head_layer, table_layer = prefill.blocks, prefill.head_layer, prefill.table_layer
    tied = table_layer is not None
    head_name = runner.head_matrix(tied)
    matrix, scales = (table_layer or head_layer).weight(head_name)
    segments = decoder_segments(manifest, config.num_hidden_layers, head_name)
    small = {name: np.array(array) for name, array in head_layer.tensors.items() if name != head_name and array.nbytes < (64 << 20)}
    plan = None
    if budget is not None and decodes:
        runner.tiles.release()  # the prefill's cast tile: the decode's tiles are counted in the plan's activations
        release_freed_memory()  # the prefill's freed temporaries: what the process holds is then what it uses
        plan = plan_residency(budget, segments, fixed_costs=_fixed_costs(runner, blocks[0], small, scales))
        logger.info("%s", plan.describe())
        if not plan.all_resident:
            model.drop_cached_pages()  # the prefill's pages of the store: the plan's copies and reads replace them
    mapped = StepWeights.reads_mapped(plan)
    return StepWeights(
        manifest,
        model.store_path,
        segments,
        plan,
        head_matrix=head_name,
        mapped_blocks=blocks,
        mapped_head=matrix,
        small_head=head_layer if mapped else dataclasses.replace(head_layer, tensors=small, quant={}, borrowed={}),
        head_scales=scales if mapped or scales is None else np.array(scales),
    )


def _fixed_costs(runner: DecoderRunner, block: Layer, small_head: Mapping[str, np.ndarray], scales: np.ndarray | None) -> dict[str, int]:
    """What a decode step holds beside the weights of its blocks and head matrix (module doc of ``memory``)."""
    c = runner.config
    kv_cache = 2 * c.num_hidden_layers * c.num_key_value_heads * runner.capacity * c.head_dim * 4
    intermediate = max(max(a.shape[0] for a in block.tensors.values()), c.hidden_size)  # the widest projection's outputs
    activations = 4 * (16 * c.hidden_size + 4 * intermediate + 3 * c.vocab_size) + ops.DECODE_CAST_TILE_BYTES  # and its cast tiles
    head = sum(a.nbytes for a in small_head.values()) + (0 if scales is None else scales.nbytes)
    return {"process": process_anonymous_bytes(), "kv_cache": kv_cache, "activations": activations, "head_small": head}


_T = TypeVar("_T")


async def _shielded(work: asyncio.Future[_T], on_cancel: Callable[[], None]) -> _T:
    """Await a thread's ``work`` shielded: cancelled, call ``on_cancel`` and re-raise while the thread goes on (a thread
    cancelled before it started would never close the weights it holds)."""
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        on_cancel()
        raise


def _close_made_weights(planning: asyncio.Future[StepWeights]) -> None:
    if not planning.cancelled() and planning.exception() is None:
        planning.result().close()


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


def decode_tokens(
    runner: DecoderRunner,
    weights: StepWeights,
    rows_of: Callable[[int], tuple[np.ndarray, np.ndarray | None]],
    first_id: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
    decode_threads: int,
    stopped: threading.Event,
    on_token: Callable[[int], None] | None,
    token_times_s: list[float],
    clock: Callable[[], float],
) -> list[int]:
    """The decode loop, off the event loop (every layer is here now): from ``first_id``, a token at a time until
    ``max_new_tokens``, an end token or ``stopped``, each drawn by ``sample``; each token's time (``clock``) appended
    to ``token_times_s``. Closes ``weights``.
    """
    eos_token_ids = runner.config.eos_token_ids
    out = [first_id]
    try:
        if on_token is not None:
            on_token(first_id)
        with runner.decoding(decode_threads):  # large matrices cast on two threads, BLAS on one
            while len(out) < max_new_tokens and out[-1] not in eos_token_ids and not stopped.is_set():
                logits = next_token_logits(runner, weights, rows_of(out[-1]))
                out.append(sample(logits[-1], temperature, top_p, rng))
                token_times_s.append(clock())
                if on_token is not None:
                    on_token(out[-1])
    finally:
        weights.close()
    return out


def next_token_logits(runner: DecoderRunner, weights: StepWeights, rows: tuple[np.ndarray, np.ndarray | None]) -> np.ndarray:
    """One decode step: the last token's embedding ``rows`` through every block and the head: (1, vocab) logits."""
    h = runner.embed(rows)
    for index in range(runner.config.num_hidden_layers):
        h = runner.block(weights.block(index), h, index)
        weights.done(index)
    normed = runner.final_norm(weights.small_head, h)
    scales = weights.head_scales

    def project(rows: np.ndarray, part: slice) -> np.ndarray:
        return runner.project(normed, rows, None if scales is None else scales[part])

    return runner.finish_logits(weights.head_logits(project))


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
