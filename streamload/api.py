"""The one-call layer over ``runtime.run``: ``embed`` texts, ``generate`` text piece by piece, and the helpers they share
(a streaming detokenizer, the model's chat template).

``Model.embed``/``Model.generate`` (async) and ``SyncModel.embed``/``SyncModel.generate`` (blocking) call these. Threads:
``generate``'s decoding runs on a worker thread (``runtime.generate``); its token ids cross to the event loop through
``call_soon_threadsafe`` into a queue, and are detokenized there. Costs: detokenizing a token decodes a window of the
last few tokens, not the whole text.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import RuntimeModelError, UsageError
from .tokenizer import NO_TOKENIZER

if TYPE_CHECKING:
    from .model import Model

REPLACEMENT_CHARACTER = "\ufffd"  # what a tokenizer decodes an incomplete UTF-8 sequence to


class StreamingDetokenizer:
    """Text pieces from token ids given one at a time, whose concatenation is ``tokenizer.decode(all ids)``.

    A piece is held back while the decoded tail ends in an incomplete UTF-8 sequence (a character split over byte
    tokens), and each step decodes a window from the last emitted boundary, so a SentencePiece word's leading space
    and a multi-byte character come out right.

    Example:
        >>> stream = StreamingDetokenizer(model.tokenizer)                  # doctest: +SKIP
        >>> "".join(stream.add(i) for i in ids) + stream.finish() == model.tokenizer.decode(ids)
        True
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # the window decoded for context starts here
        self._read_offset = 0  # ids before this are emitted
        self._emitted: list[str] = []

    def add(self, token_id: int) -> str:
        """The new text this token completes ('' while a character is incomplete)."""
        self._ids.append(int(token_id))
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT_CHARACTER) or not text.startswith(prefix):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        piece = text[len(prefix) :]
        self._emitted.append(piece)
        return piece

    def finish(self) -> str:
        """What is left once the last token is in: the rest of the whole decode (a trailing incomplete character too)."""
        whole, emitted = self._tokenizer.decode(self._ids), "".join(self._emitted)
        rest = whole[len(emitted) :] if whole.startswith(emitted) else ""
        self._emitted.append(rest)
        return rest


def chat_template_of(config: Mapping[str, Any]) -> str | None:
    """The chat template ``convert`` kept from tokenizer_config.json (None: the model has none)."""
    template = config.get("chat_template")
    return template if isinstance(template, str) and template else None


def apply_chat_template(config: Mapping[str, Any], messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt text for ``messages`` (``{"role": "user", "content": ...}``), rendered as transformers renders it.

    Raises:
        RuntimeModelError: the model has no chat template, jinja2 is not installed, or the template fails.
    """
    template = chat_template_of(config)
    if template is None:
        raise RuntimeModelError("this model has no chat template (its tokenizer_config.json had none)")
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise RuntimeModelError("a chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers configures it
    environment.globals["raise_exception"] = raise_exception
    tokens = config.get("chat_special_tokens")
    tokens = {k: v for k, v in tokens.items() if isinstance(v, str)} if isinstance(tokens, Mapping) else {}
    try:
        return environment.from_string(template).render(messages=list(messages), add_generation_prompt=True, **tokens)
    except TemplateError as exc:
        raise RuntimeModelError(f"the model's chat template failed: {exc}") from None


async def embed(model: Model, texts: str | Sequence[str]) -> np.ndarray:
    """``Model.embed``: one embedding per text, (B, H) float32; a single string gives (H,)."""
    from . import runtime

    one = isinstance(texts, str)
    result = await runtime.run(model, texts=[texts] if one else texts)  # type: ignore[list-item]
    if result.embedding is None:
        raise RuntimeModelError(f"embed needs an encoder; this model is a {result.architecture} decoder: use generate")
    return result.embedding[0] if one else result.embedding


class _Stop(Exception):
    """Raised from ``on_token`` on the decode thread when the reader of ``generate`` left: ends the decoding."""


async def generate(
    model: Model,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> AsyncIterator[str]:
    """``Model.generate``: text pieces as the decoder samples them; stopping the iteration stops the decoding."""
    from . import runtime

    if isinstance(prompt, str):
        options: dict[str, Any] = {"texts": [prompt]}
    elif isinstance(prompt, Sequence) and not isinstance(prompt, bytes):
        options = {"ids": list(prompt)}
    else:
        raise UsageError(f"prompt must be a string or a list of token ids; got {type(prompt).__name__}")
    runtime.check_options(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, **options)
    if model.manifest.architecture == "bert":
        raise RuntimeModelError("generate needs a decoder; this model is a bert encoder: use embed")
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise RuntimeModelError(NO_TOKENIZER.split(":")[0] + ": its output cannot be shown as text (runtime.run gives token ids)")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[int | None] = asyncio.Queue()
    left = False

    def on_token(token_id: int) -> None:  # the decode thread
        if left:
            raise _Stop
        loop.call_soon_threadsafe(queue.put_nowait, token_id)

    task = asyncio.ensure_future(
        runtime.run(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, on_token=on_token, **options)
    )
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every token: they were queued before the thread ended
    stream = StreamingDetokenizer(tokenizer)
    try:
        while (token_id := await queue.get()) is not None:
            piece = stream.add(token_id)
            if piece:
                yield piece
        await task
        rest = stream.finish()
        if rest:
            yield rest
    finally:
        left = True
        if not task.done():
            task.cancel()  # the prefill stops at its next await; a running decode at its next token (_Stop)
        with contextlib.suppress(_Stop, asyncio.CancelledError):
            await task
