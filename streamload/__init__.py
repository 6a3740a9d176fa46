"""streamload: stream int8 language models over HTTP and run them while they download.

One call, blocking (``load`` takes a URL, a local .slm path, or a cached model's name or digest prefix):

    >>> import streamload                                                  # doctest: +SKIP
    >>> streamload.load("http://127.0.0.1:8800/minilm.slm").embed(["hello world"]).shape
    (1, 384)
    >>> with streamload.load("http://127.0.0.1:8800/llama.slm") as model:
    ...     for piece in model.generate("The sky is", max_new_tokens=16):
    ...         print(piece, end="", flush=True)

The async twins (``open`` yields a ``Model``; ``await model.embed(...)``, ``async for piece in model.generate(...)``):

    >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:   # doctest: +SKIP
    ...     vectors = await model.embed(["hello world"])
    ...     layer0 = await model.layer(0)                  # the layer API: zero-copy views as each layer lands

``streamload.runtime`` is the layer below ``embed``/``generate``: ``await runtime.run(model, texts=[...])`` returns a
``RunResult`` with the timeline of every layer; ``runtime.run_progressive`` yields a preview first.
"""

from typing import Any

from .errors import (
    CacheError,
    ChunkIntegrityError,
    DigestMismatchError,
    FetchError,
    FormatError,
    HTTPStatusError,
    RuntimeModelError,
    StalledError,
    StreamloadError,
    UsageError,
)
from .layer import Layer
from .model import Model, open, read_remote_header
from .stats import DownloadStats, Progress
from .sync import SyncModel, load
from .transport.httputil import RetryPolicy


def __getattr__(name: str) -> Any:
    """``__version__``, read from the package metadata on first use (importlib.metadata costs ~20 ms at import), and
    ``runtime``, imported on first use (a process that only fetches does not load it)."""
    if name == "runtime":
        import importlib

        return importlib.import_module(".runtime", __name__)  # binds streamload.runtime: this runs once
    if name != "__version__":
        raise AttributeError(f"module 'streamload' has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version("streamload")  # one source of truth: pyproject's version
    except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
        version = "0+unknown"
    globals()["__version__"] = version
    return version


__all__ = [
    "CacheError",
    "ChunkIntegrityError",
    "DigestMismatchError",
    "DownloadStats",
    "FetchError",
    "FormatError",
    "HTTPStatusError",
    "Layer",
    "Model",
    "Progress",
    "RetryPolicy",
    "RuntimeModelError",
    "StalledError",
    "StreamloadError",
    "SyncModel",
    "UsageError",
    "load",
    "open",
    "read_remote_header",
    "runtime",
]
