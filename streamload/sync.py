"""The blocking face for apps that are not async: a model whose waits run on a private event-loop thread, the async
``Model``'s calls made there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .layer import Layer
from .model import Model, ModelBase, open
from .stats import DownloadStats

if TYPE_CHECKING:
    from .runtime import RunResult


class SyncModel(ModelBase):
    """The blocking twin of ``Model`` (the same properties, from ``ModelBase``); get one from ``streamload.load``.

    Example:
        >>> with streamload.load("http://127.0.0.1:8800/minilm.slm") as model:   # doctest: +SKIP
        ...     for index, layer in model.layers():
        ...         print(index, layer.name)
    """

    def __init__(self, source: str | os.PathLike[str], **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamload-loop", daemon=True)
        self._thread.start()
        self._context = open(source, **options)
        try:
            model: Model = self._run(self._context.__aenter__())
        except BaseException:
            self._stop()
            raise
        super().__init__(model._session)
        self._model = model  # the async face, for what runs on the private loop (the runtime awaits its layers)

    @property
    def waits_on_own_loop(self) -> bool:
        """True: every wait runs on this model's private loop (its own thread); ``model.run`` calls the runtime there."""
        return True

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def layer(self, index: int) -> Layer:
        """Block until layer ``index`` is ready (moving it to the front of the queue)."""
        return self._run(self._model.layer(index))

    def coarse_layer(self, index: int) -> Layer:
        """Block until layer ``index`` is usable at coarse precision (``Model.coarse_layer``)."""
        return self._run(self._model.coarse_layer(index))

    def rows(self, name: str, ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Block until rows ``ids`` of ``name`` are here (fetched first); see ``Model.rows``."""
        return self._run(self._model.rows(name, ids))

    def embed(self, texts: str | Sequence[str]) -> np.ndarray:
        """Block until the embeddings are computed; see ``Model.embed``.

        Example:
            >>> streamload.load("http://127.0.0.1:8800/minilm.slm").embed(["hello world"]).shape   # doctest: +SKIP
            (1, 384)
        """
        return self._run(self._model.embed(texts))

    def generate(
        self, prompt: str | Sequence[int], *, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0
    ) -> Iterator[str]:
        """Text pieces as each token is sampled; see ``Model.generate`` (leaving the loop early stops the decoding).

        Example:
            >>> with streamload.load("http://127.0.0.1:8800/llama.slm") as model:          # doctest: +SKIP
            ...     for piece in model.generate("The sky is", max_new_tokens=8):
            ...         print(piece, end="", flush=True)
        """
        pieces = self._model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        try:
            while True:
                try:
                    yield self._run(pieces.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(pieces.aclose())

    def run(self, **options: Any) -> RunResult:
        """Block until ``streamload.runtime.run(model, **options)`` has the result (the timeline, bytes needed, ids).

        Example:
            >>> with streamload.load("http://127.0.0.1:8800/minilm.slm") as model:       # doctest: +SKIP
            ...     model.run(texts=["hello world"]).embedding.shape
            (1, 384)
        """
        from .runtime import run

        return self._run(run(self._model, **options))

    def layers(self) -> Iterator[tuple[int, Layer]]:
        for index in range(len(self.manifest.layers)):
            yield index, self.layer(index)

    def wait_complete(self) -> DownloadStats:
        return self._run(self._model.wait_complete())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._context.__aexit__(None, None, None))
        self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(source: str | os.PathLike[str], **options: Any) -> SyncModel:
    """Open a model without async; takes the same keyword options as ``streamload.open``.

    ``source`` is a URL, a local .slm path, or a cached model's name or digest prefix (as ``streamload list`` shows).
    Close it (``with``, or ``close()``) to stop its download; the blocking calls are ``layer``, ``rows``, ``embed``,
    ``generate``, ``wait_complete``; ``streamload.open`` is the async twin.

    Example:
        >>> streamload.load("http://127.0.0.1:8800/minilm.slm").embed(["hello world"]).shape   # doctest: +SKIP
        (1, 384)
        >>> with streamload.load("llama") as model:                                     # doctest: +SKIP
        ...     print("".join(model.generate("The sky is", max_new_tokens=8)))
    """
    return SyncModel(source, **options)
