"""streamload: stream int8 language models over HTTP and run them while they download.

Example:
    >>> import streamload                                                  # doctest: +SKIP
    >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:
    ...     layer0 = await model.layer(0)
"""

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
)
from .httputil import RetryPolicy
from .layer import Layer
from .model import Model, open, read_remote_header
from .stats import DownloadStats, Progress
from .sync import SyncModel, load


def __getattr__(name: str) -> str:
    """``__version__``, read from the package metadata on first use (importlib.metadata costs ~20 ms at import)."""
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
    "load",
    "open",
    "read_remote_header",
]
