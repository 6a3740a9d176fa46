"""streamload: stream int8 language models over HTTP and run them while they download.

Example:
    >>> import streamload                                                  # doctest: +SKIP
    >>> async with streamload.open("http://127.0.0.1:8800/minilm.slm") as model:
    ...     layer0 = await model.layer(0)
"""

from importlib import metadata as _metadata

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

try:
    __version__ = _metadata.version("streamload")  # one source of truth: pyproject's version
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

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
