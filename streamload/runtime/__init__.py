"""The numpy int8 runtime: run a model while it streams in.

``run`` picks the architecture from the manifest: BERT encoders return a sentence
embedding, decoders (Llama, Qwen2, Qwen3, Mistral, Phi-3, Gemma 2, GPT-2) generate tokens. Each layer's compute starts as soon
as that layer has arrived and runs on a worker thread, so the download goes on.
``run_progressive`` yields a preview first, computed on a progressive model's
coarse layers while their refinements stream in, then the exact result.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import NoTokenizerError, RuntimeModelError, UsageError
from ..formats.architectures import architecture_named
from ..tokenizer import NO_TOKENIZER
from .memory import MemoryBudget, read_cgroup_memory_limit
from .ops import DEFAULT_DECODE_THREADS, FloatWeightCache, default_float_weight_budget_bytes
from .timeline import LayerTiming, RowsTiming, Timeline

if TYPE_CHECKING:
    from ..model import Model
    from .generate import Generation

SUPPORTED_ARCHITECTURES = ("bert", "llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gpt2", "olmo2", "granite", "stablelm")
DECODERS = SUPPORTED_ARCHITECTURES[1:]  # run by ``generate.generate``, each as its family description says


@dataclasses.dataclass(slots=True)
class ModelState:
    """What the runtime keeps per model between runs (on ``Model.runtime_state``; it goes with the model)."""

    float_weights: FloatWeightCache  # float32 copies of int8 weights an encoder reuses on every batch
    validated: bool = False  # the config passed its family's ``validate`` (1 ms a call on MiniLM, a tenth of a sentence)


def model_state(model: Model) -> ModelState:
    """The runtime's state of ``model``, made on its first run."""
    state = model.runtime_state
    if state is None:
        state = model.runtime_state = ModelState(FloatWeightCache(default_float_weight_budget_bytes()))
    return state


@dataclasses.dataclass(frozen=True, slots=True)
class RunResult:
    architecture: str
    embedding: np.ndarray | None  # encoder: (B, H) float32
    generated_ids: list[int] | None  # decoder
    text: str | None  # decoder, when the model has a tokenizer
    prompt_logits: np.ndarray | None  # decoder, (T, vocab) float32, when asked for
    timeline: list[LayerTiming]
    first_block_done_s: float | None  # block 0's compute finished (layer 1: layer 0 is the embeddings)
    total_s: float
    row_fetches: list[RowsTiming] = dataclasses.field(default_factory=list)  # the rows of the token table the input needed
    bytes_needed: int = 0  # bytes of the file the result depended on (header, the layers used, the rows' chunks)
    precision: str = "exact"  # "coarse": a preview on a progressive model's coarse layers (``run_progressive``)
    first_token_logits: np.ndarray | None = None  # decoder, (vocab,): what the first generated token was sampled from
    first_token_s: float | None = None  # decoder: when the first token was there
    token_times_s: list[float] | None = None  # decoder: when each generated token was there

    @property
    def first_layer_done_s(self) -> float | None:
        """Deprecated: the old name of ``first_block_done_s`` (block 0, which is layer 1), kept for one release."""
        return self.first_block_done_s


async def run_progressive(model: Model, **options: Any) -> AsyncIterator[RunResult]:
    """Yield a preview (``precision="coarse"``), then the exact result, of ``run(model, **options)``.

    The preview runs on the coarse layers of a progressive model as they arrive (``Model.coarse_layer``), while
    the refinements stream in behind them; the exact pass then runs on the exact layers and equals ``run``'s
    result bit for bit. A model that is not progressive, or whose refinements are all here already, yields the
    exact result only. Both count time from the same start (``started``, default now).

    Example:
        >>> async for result in runtime.run_progressive(model, texts=["hello world"]):   # doctest: +SKIP
        ...     print(result.precision, result.total_s)
        coarse 0.61
        exact 1.02
    """
    options.setdefault("started", time.perf_counter())
    refined = all(ready is not None for ready in model.layer_ready_s[: model.manifest.step_count])
    if model.progressive and not refined:
        preview = await run(model.coarse(), **{k: v for k, v in options.items() if k != "on_token"})  # type: ignore[arg-type]
        yield dataclasses.replace(preview, precision="coarse")
    yield await run(model, **options)


def memory_budget(setting: int | MemoryBudget | Literal["auto"] | None) -> MemoryBudget | None:
    """The budget ``run`` keeps to for ``memory_budget_bytes`` (see there; a ``MemoryBudget`` says where it came from)."""
    if setting == "auto":
        return read_cgroup_memory_limit()
    if setting is None or isinstance(setting, MemoryBudget):
        return setting
    if isinstance(setting, bool) or not isinstance(setting, int):
        raise UsageError(f"memory_budget_bytes must be a number of bytes, 'auto' or None, not {setting!r}")
    return MemoryBudget(setting, "argument")


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Token ids index the embedding table: refuse any outside it before it is read."""
    if not ids:
        raise RuntimeModelError("the input needs at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RuntimeModelError(f"token ids must be in [0, {vocab_size}); got {bad[0]}")


def check_options(
    *,
    texts: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> None:
    """The checks the CLI's argument types make, for callers of the library: ``UsageError`` naming the argument."""
    if (texts is None) == (ids is None):
        raise UsageError("give either texts (a list of strings) or ids (a list of token ids), not both")
    if texts is not None:
        if isinstance(texts, (str, bytes)):
            raise UsageError(f"texts must be a list of strings, not one string: texts=[{texts!r}]")
        if not isinstance(texts, Sequence) or not texts:
            raise UsageError("texts must be a non-empty list of strings")
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise UsageError(f"texts must hold non-empty strings; got {text!r}")
    if ids is not None and (isinstance(ids, (str, bytes)) or not all(isinstance(i, (int, np.integer)) for i in ids)):
        raise UsageError("ids must be a list of integer token ids")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be an integer 0 or more; got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise UsageError(f"temperature must be 0 (greedy) or more; got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1]; got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"seed must be an integer 0 or more; got {seed!r}")


async def run(
    model: Model,
    *,
    texts: Sequence[str] | None = None,
    ids: Sequence[int] | None = None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    keep_prompt_logits: bool = False,
    started: float | None = None,
    memory_budget_bytes: int | MemoryBudget | Literal["auto"] | None = "auto",
    float_weights_bytes: int | None = None,
    decode_threads: int = DEFAULT_DECODE_THREADS,
    on_token: Callable[[int], None] | None = None,
) -> RunResult:
    """Run a streamed model on text or token ids.

    Args:
        model: an open ``streamload.Model`` (layers may still be arriving).
        texts: a list of non-empty strings (encoder: one embedding each; decoder: exactly one, the prompt).
            A bare string is refused (it is not a list of texts); ``Model.embed`` takes one.
        ids: token ids instead of text.
        max_new_tokens, temperature, top_p, seed: a decoder's generation: >= 0, >= 0 (0: greedy), in (0, 1], >= 0.
        started: ``time.perf_counter()`` the timeline counts from (default: now).
        memory_budget_bytes: bytes the run may use, page cache included; "auto" (default): the memory limit of the
            process's cgroup, if any; None: no budget. Under a budget below the model's size a decoder keeps what fits
            resident and reads the rest from the cache's store on every token (``runtime.memory``); an encoder drops
            each layer's pages after its pass.
        float_weights_bytes: bytes of float32 copies of int8 weights an encoder may keep for the next batches (None:
            an eighth of physical memory, at most 512 MiB, less under a memory budget; 0: int8 only).
        decode_threads: a decoder casts each large int8 matrix on this many threads, 1 or 2 (``ops.DecodeThreads``).
        on_token: a decoder calls it with each generated token id as soon as it is sampled, on the decode
            thread (``Model.generate`` yields them instead).

    Raises:
        UsageError: an argument out of its range (texts not a list of non-empty strings, temperature < 0, ...).
        RuntimeModelError: unknown architecture, missing tokenizer, bad input.
        MemoryBudgetError: the budget cannot hold one step of the model (the message names the minimum).
        ManifestSchemaError: the model's config contradicts its tensors, or a field is out of range.

    Example:
        >>> async with streamload.open(url) as model:                        # doctest: +SKIP
        ...     result = await runtime.run(model, texts=["hello world"])
        ...     result.embedding.shape
        (1, 384)
    """
    check_options(texts=texts, ids=ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    _check_async_model(model)
    timeline = Timeline(model, started)
    budget = memory_budget(memory_budget_bytes)
    state = _prepare_model(model, float_weights_bytes)
    architecture = model.manifest.architecture
    if architecture == "bert":
        return _result(model, timeline, architecture, embedding=await _encode(model, texts, ids, timeline, state, budget))
    if architecture in DECODERS:
        from . import generate  # each architecture's module on first use: a cold start imports only its own

        generation = await generate.generate(
            model,
            _prompt_ids(model, texts, ids),
            timeline,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            keep_prompt_logits=keep_prompt_logits,
            memory_budget=budget,
            decode_threads=decode_threads,
            on_token=on_token,
        )
        return _result(model, timeline, architecture, generation=generation)
    raise RuntimeModelError(f"cannot run architecture {architecture!r}; the runtime runs: {', '.join(SUPPORTED_ARCHITECTURES)}")


def _check_async_model(model: Model) -> None:
    """Refuse a ``SyncModel``: its layers are awaited on its own loop, not this one."""
    if model.waits_on_own_loop:
        raise UsageError("runtime.run takes a model from streamload.open; for one from streamload.load call model.run(...)")


def _prepare_model(model: Model, float_weights_bytes: int | None) -> ModelState:
    """The model's runtime state, its config validated once and its float32 copies' budget set when given."""
    family = architecture_named(model.manifest.architecture)
    state = model_state(model)
    if family is not None and not state.validated:
        family.validate(model.config, model.manifest)  # every field the runtime reads, against the tensor shapes, before any allocation
        state.validated = True
    if float_weights_bytes is not None:
        if float_weights_bytes < 0:
            raise UsageError(f"float_weights_bytes cannot be negative, got {float_weights_bytes}")
        state.float_weights.set_budget(float_weights_bytes)
    return state


async def _encode(
    model: Model, texts: Sequence[str] | None, ids: Sequence[int] | None, timeline: Timeline, state: ModelState, budget: MemoryBudget | None
) -> np.ndarray:
    """An encoder's sentence embeddings of the texts (one each) or of the ids (one sequence): (B, H) float32."""
    from . import bert  # each architecture's module on first use: a cold start imports only its own

    config = bert.BertConfig.from_manifest(model.config)
    if texts is not None:
        batch = bert.tokenize(model, texts, config)
    else:
        _check_ids(ids or [], int(model.config.get("vocab_size", 0)))
        row = np.asarray([list(ids or [])], dtype=np.int64)
        batch = bert.EncodedBatch(row, np.zeros_like(row), np.ones_like(row))
    return await bert.encode(model, batch, timeline, float_weights=state.float_weights, memory_budget=budget)


def _prompt_ids(model: Model, texts: Sequence[str] | None, ids: Sequence[int] | None) -> list[int]:
    """A decoder's prompt: the one text's tokens, or the ids."""
    if texts is None:
        return list(ids or [])
    if len(texts) != 1:
        raise UsageError(f"a decoder takes one prompt; got {len(texts)} texts (join them, or run them one by one)")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise NoTokenizerError(NO_TOKENIZER)
    return tokenizer.encode(texts[0]).ids


def _result(
    model: Model, timeline: Timeline, architecture: str, *, embedding: np.ndarray | None = None, generation: Generation | None = None
) -> RunResult:
    """The run's result: an encoder's ``embedding`` or a decoder's ``Generation`` (its text decoded first), and
    the timeline as it ends now."""
    if generation is None:
        return RunResult(architecture, embedding, None, None, None, *_timings(model, timeline))
    tokenizer = model.tokenizer
    text = tokenizer.decode(generation.generated_ids) if tokenizer is not None else None
    return RunResult(
        architecture,
        None,
        generation.generated_ids,
        text,
        generation.prompt_logits,
        *_timings(model, timeline),
        first_token_logits=generation.first_token_logits,
        first_token_s=generation.first_token_s,
        token_times_s=generation.token_times_s,
    )


def _timings(model: Model, timeline: Timeline) -> tuple[list[LayerTiming], float | None, float, list[RowsTiming], int]:
    """``RunResult``'s timing fields, read now: the layers' records, block 0's end, the total, the rows, the bytes needed."""
    return timeline.records, timeline.first_block_done_s(), timeline.now_s(), timeline.row_records, model.bytes_needed


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LayerTiming",
    "ModelState",
    "RowsTiming",
    "RunResult",
    "Timeline",
    "check_options",
    "run",
    "run_progressive",
]
