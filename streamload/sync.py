"""A blocking wrapper for apps that are not async: the event loop runs on a private thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from .formats import Manifest
from .loader import DownloadStats, Layer, Model, open


class SyncModel:
    """The blocking twin of ``Model``; get one from ``streamload.load``.

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
            self._model: Model = self._run(self._context.__aenter__())
        except BaseException:
            self._stop()
            raise

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def manifest(self) -> Manifest:
        return self._model.manifest

    @property
    def config(self) -> Mapping[str, Any]:
        return self._model.config

    @property
    def digest(self) -> str:
        return self._model.digest

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    @property
    def stats(self) -> DownloadStats:
        return self._model.stats

    def layer(self, index: int) -> Layer:
        return self._run(self._model.layer(index))

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
    """Open a model without async; takes the same keyword options as ``streamload.open``."""
    return SyncModel(source, **options)
