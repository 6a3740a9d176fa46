"""The numpy int8 runtime: run a model while it streams in.

``run`` picks the architecture from the manifest: BERT encoders return a sentence
embedding, Llama decoders generate tokens. Each layer's compute starts as soon
as that layer has arrived and runs on a worker thread, so the download goes on.
``run_progressive`` yields a preview first, computed on a progressive model's
coarse layers while their refinements stream in, then the exact result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import NoTokenizerError, RuntimeModelError
from ..formats.architectures import architecture_named
from ..tokenizer import NO_TOKENIZER
from .timeline import LayerTiming, RowsTiming, Timeline

if TYPE_CHECKING:
    from ..model import Model

SUPPORTED_ARCHITECTURES = ("bert", "llama")
VALIDATED_DIGESTS_KEPT = 64  # manifests whose config already passed ``validate`` (1 ms a call on MiniLM, a tenth of a sentence)

_validated_digests: set[str] = set()


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
        preview = await run(model.coarse(), **options)  # type: ignore[arg-type]
        yield dataclasses.replace(preview, precision="coarse")
    yield await run(model, **options)


def _check_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Token ids index the embedding table: refuse any outside it before it is read."""
    if not ids:
        raise RuntimeModelError("the input needs at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise RuntimeModelError(f"token ids must be in [0, {vocab_size}); got {bad[0]}")


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
) -> RunResult:
    """Run a streamed model on text or token ids.

    Args:
        model: an open ``streamload.Model`` (layers may still be arriving).
        texts: sentences (encoder: one embedding each; decoder: the first is the prompt).
        ids: token ids instead of text.
        started: ``time.perf_counter()`` the timeline counts from (default: now).

    Raises:
        RuntimeModelError: unknown architecture, missing tokenizer, bad input.
        ManifestSchemaError: the model's config contradicts its tensors, or a field is out of range.

    Example:
        >>> async with streamload.open(url) as model:                        # doctest: +SKIP
        ...     result = await runtime.run(model, texts=["hello world"])
        ...     result.embedding.shape
        (1, 384)
    """
    if (texts is None) == (ids is None):
        raise RuntimeModelError("give either text or token ids")
    timeline = Timeline(model, started)
    architecture = model.manifest.architecture
    family = architecture_named(architecture)
    if family is not None and model.digest not in _validated_digests:
        family.validate(model.config, model.manifest)  # every field the runtime reads, against the tensor shapes, before any allocation
        if len(_validated_digests) >= VALIDATED_DIGESTS_KEPT:
            _validated_digests.clear()
        _validated_digests.add(model.digest)  # the digest hashes the manifest, config included: once per model, not per call
    if architecture == "bert":
        from . import bert  # each architecture's module on first use: a cold start imports only its own

        config = bert.BertConfig.from_manifest(model.config)
        if texts is not None:
            batch = bert.tokenize(model, texts, config)
        else:
            _check_ids(ids or [], int(model.config.get("vocab_size", 0)))
            row = np.asarray([list(ids or [])], dtype=np.int64)
            batch = bert.EncodedBatch(row, np.zeros_like(row), np.ones_like(row))
        embedding = await bert.encode(model, batch, timeline)
        return RunResult(
            "bert",
            embedding,
            None,
            None,
            None,
            timeline.records,
            timeline.first_block_done_s(),
            timeline.now_s(),
            timeline.row_records,
            model.bytes_needed,
        )
    if architecture == "llama":
        from . import llama

        if texts is not None:
            tokenizer = model.tokenizer
            if tokenizer is None:
                raise NoTokenizerError(NO_TOKENIZER)
            prompt = tokenizer.encode(texts[0]).ids
        else:
            prompt = list(ids or [])
        generation = await llama.generate(
            model,
            prompt,
            timeline,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            keep_prompt_logits=keep_prompt_logits,
        )
        tokenizer = model.tokenizer
        text = tokenizer.decode(generation.generated_ids) if tokenizer is not None else None
        return RunResult(
            "llama",
            None,
            generation.generated_ids,
            text,
            generation.prompt_logits,
            timeline.records,
            timeline.first_block_done_s(),
            timeline.now_s(),
            timeline.row_records,
            model.bytes_needed,
            first_token_logits=generation.first_token_logits,
            first_token_s=generation.first_token_s,
        )
    raise RuntimeModelError(f"cannot run architecture {architecture!r}; the runtime runs: {', '.join(SUPPORTED_ARCHITECTURES)}")


__all__ = ["SUPPORTED_ARCHITECTURES", "LayerTiming", "RowsTiming", "RunResult", "Timeline", "run", "run_progressive"]
