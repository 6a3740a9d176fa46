"""streamload's exceptions: the whole tree, drawn once.

::

    StreamloadError
    ├── FormatError (ValueError)             a .slm file, manifest or config is malformed
    │   ├── BadMagicError                    not a .slm file
    │   ├── UnsupportedVersionError          written by another format version
    │   ├── ManifestTooLargeError            manifest over the reader's cap
    │   ├── ManifestDecodeError              manifest is not valid msgpack
    │   ├── ManifestSchemaError              a field is missing, mistyped or out of range
    │   │   ├── UnknownDTypeError            a tensor dtype this reader does not know
    │   │   ├── OutOfBoundsError             an offset or size points outside the file or store
    │   │   └── OverlapError                 two chunks or tensors share bytes
    │   ├── ChunkDecodeError                 a chunk is not exactly one well-formed zstd frame
    │   │   └── ChunkSizeError               a chunk decompresses to other than its declared size
    │   └── ChunkIntegrityError              a chunk's sha256 differs (every retry did)
    ├── ConversionError (ValueError)         a model cannot be converted
    │   ├── ConversionInputError             the model folder or file to convert is unreadable or inconsistent
    │   │   └── NoConfigError                a model to convert without its config.json (give ``config_path``)
    │   └── UnsupportedArchitectureError     the model type is not one streamload runs
    ├── FetchError (OSError)                 the network or server failed (after retries)
    │   ├── HTTPStatusError                  an unexpected HTTP status
    │   ├── StalledError                     no progress within the read timeout or rate floor
    │   ├── FileChangedError                 the file on the server changed mid-download
    │   ├── MalformedResponseError           an answer breaks HTTP's syntax (a header, a redirect's Location)
    │   └── RetryableError                   one attempt failed; the caller retries (internal)
    │       └── UnreachableError             nobody answers at the address (refused, no route, no such host)
    ├── ModelFileError (OSError)             a local model file cannot be opened (missing, a directory, unreadable)
    │   └── ModelDirectoryError              the directory of models to serve is not a directory (a NotADirectoryError)
    ├── InvalidURLError (ValueError)         a model or mirror URL that is not a usable http(s) URL
    ├── DigestMismatchError (ValueError)     the manifest is not the pinned one
    ├── CacheError (OSError)                 the cache is unusable (damage offline, a symbolic link)
    │   └── CacheWriteError                  the cache's disk is full or its directory not writable
    ├── RuntimeModelError (ValueError)       the model or its input cannot be run
    │   ├── MemoryBudgetError                a memory budget too small to run the model at all
    │   └── NoTokenizerError                 text given to a model without a tokenizer
    ├── UsageError (ValueError)              an argument to the library is out of its range
    └── WriterStageError (RuntimeError)      a ModelWriter call out of order (a tensor outside a layer, ...)

Messages say what happened and what to do in the library's own terms (``cache_dir=``, token ids); the CLI adds
the flag or command that does it (``--cache-dir``, ``--ids``, ``streamload rm``), from the class and fields here.
The HTTP paths' internal signals (a 304, a redirect, an error status, a response only aiohttp can read) are
not errors and never reach a caller: they live with the transports, in ``streamload.transport.httputil``.

A message never shows a credential held in a URL: ``str()`` of any of these errors
redacts the password (user info) and the query string (a signed URL's token) of
every http(s) URL in it (``redact_urls``), wherever the message was built.
"""

from __future__ import annotations

import re

# an http(s) URL's user info (user:password@) and its query string (?X-Amz-Signature=...): both may be credentials
_USERINFO = re.compile(r"(?i)\b(https?://)[^\s/?#@'\"<>]*@")
_QUERY = re.compile(r"(?i)(\bhttps?://[^\s?#'\"<>]*)\?[^\s#'\"<>]*")


def redact_urls(text: str) -> str:
    """``text`` with every http(s) URL's user info and query string replaced by ``***``: what logs, errors and the
    cache's refs show of a URL (a signed query string or a password is a credential)."""
    text = _USERINFO.sub(r"\1***@", text)
    return _QUERY.sub(_redact_query, text)


def _redact_query(match: re.Match[str]) -> str:
    """Keep punctuation that ends a sentence after the URL (``URL: reason``, ``(URL)``)."""
    query = match.group(0)[len(match.group(1)) :]
    tail = len(query) - len(query.rstrip(".,:;)]"))
    return f"{match.group(1)}?***{query[len(query) - tail :] if tail else ''}"


class StreamloadError(Exception):
    """Base class of every error streamload raises on purpose."""

    def __str__(self) -> str:
        return redact_urls(super().__str__())


# ------------------------------------------------------------------ the container format


class FormatError(StreamloadError, ValueError):
    """A .slm file, manifest or model config is malformed."""


class BadMagicError(FormatError):
    """The file does not start with the .slm magic bytes."""


class UnsupportedVersionError(FormatError):
    """The file's format version is not one this reader reads."""


class ManifestTooLargeError(FormatError):
    """The declared manifest size is over the reader's cap."""


class ManifestDecodeError(FormatError):
    """The manifest bytes are not valid msgpack."""


class ManifestSchemaError(FormatError):
    """A manifest field is missing, has the wrong type or an impossible value."""


class UnknownDTypeError(ManifestSchemaError):
    """A tensor declares a dtype this reader does not know."""


class OutOfBoundsError(ManifestSchemaError):
    """An offset or size points outside the file, the data region or the layer store."""


class OverlapError(ManifestSchemaError):
    """Two chunks or two tensors claim the same bytes."""


class ChunkDecodeError(FormatError):
    """A chunk is not exactly one well-formed zstd frame."""


class ChunkSizeError(ChunkDecodeError):
    """A chunk declares or yields a raw size other than the manifest's (a decompression bomb, or damage)."""


class ChunkIntegrityError(FormatError):
    """A chunk's sha256 does not match the manifest; its bytes must never be used."""

    def __init__(self, message: str, *, layer_index: int, chunk_index: int) -> None:
        super().__init__(message)
        self.layer_index = layer_index
        self.chunk_index = chunk_index


def located(exc: FormatError, where: str) -> FormatError:
    """A new error of ``exc``'s class, its fields kept, whose message starts with ``where`` (a path or a URL)."""
    fields = {"layer_index": exc.layer_index, "chunk_index": exc.chunk_index} if isinstance(exc, ChunkIntegrityError) else {}
    return type(exc)(f"{where}: {exc}", **fields)


# ------------------------------------------------------------------ conversion


class ConversionError(StreamloadError, ValueError):
    """A source model cannot be converted."""


class ConversionInputError(ConversionError):
    """The model folder or file to convert is missing, unreadable or inconsistent."""


class NoConfigError(ConversionInputError):
    """The model to convert has no config.json beside its weights nor in its metadata: give one (``config_path``)."""


class UnsupportedArchitectureError(ConversionError):
    """The source's model type is not one streamload can run."""


# ------------------------------------------------------------------ the network


class FetchError(StreamloadError, OSError):
    """Downloading failed and retrying did not help."""


class HTTPStatusError(FetchError):
    """The server answered with a status we cannot use."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class StalledError(FetchError):
    """No bytes (or too few) arrived within the read timeout or the minimum-rate window."""


class FileChangedError(FetchError):
    """The file on the server was replaced while it was being downloaded."""


class MalformedResponseError(FetchError):
    """The server's answer breaks HTTP's syntax: a Content-Length or Content-Range that is not a bounded byte count,
    a redirect to something that is not a URL. Not retried: the same server answers the same way."""


class RetryableError(FetchError):
    """One attempt failed in a way another attempt may not (reset, 5xx, short body)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnreachableError(RetryableError):
    """Nobody answers at the address (connection refused, no route, no such host): a complete cached copy may be used
    at once, and a redirect target that went away is resolved again from the original URL."""


# ------------------------------------------------------------------ the rest


class ModelFileError(StreamloadError, OSError):
    """A local model file cannot be opened: missing, a directory, or unreadable."""


class ModelDirectoryError(ModelFileError, NotADirectoryError):
    """The directory of models to serve is missing or not a directory."""


class InvalidURLError(StreamloadError, ValueError):
    """A model or mirror URL that cannot be used: not http(s), no host, a port out of range, a malformed address."""


class DigestMismatchError(StreamloadError, ValueError):
    """The manifest's digest differs from the one the caller pinned.

    ``cached_digest``: the pinned model's digest when a partial copy of it is in the cache and cannot be completed
    from this source (removing it is one way out; the CLI names the command)."""

    def __init__(self, message: str, *, cached_digest: str | None = None) -> None:
        super().__init__(message)
        self.cached_digest = cached_digest


class CacheError(StreamloadError, OSError):
    """The cache directory cannot be used."""


class CacheWriteError(CacheError):
    """The cache's disk is full or its directory is not writable: free space, fix permissions or use another directory."""


class RuntimeModelError(StreamloadError, ValueError):
    """The model or its input cannot be run."""


class MemoryBudgetError(RuntimeModelError):
    """The memory budget cannot hold what one step of the model needs; ``minimum_bytes`` is the least that can."""

    def __init__(self, message: str, *, minimum_bytes: int) -> None:
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class NoTokenizerError(RuntimeModelError):
    """Text was given to a model that has no tokenizer: give token ids instead."""


class UsageError(StreamloadError, ValueError):
    """An argument to the library is out of its range."""


class WriterStageError(StreamloadError, RuntimeError):
    """A ``ModelWriter`` method was called in a stage where it cannot run (the caller's bug, not the data's)."""


# Names kept for one release after their renames (docs/api.md, "Renamed"): the same classes.
SourceError = ConversionInputError
SourceChangedError = FileChangedError

__all__ = [
    "BadMagicError",
    "CacheError",
    "CacheWriteError",
    "ChunkDecodeError",
    "ChunkIntegrityError",
    "ChunkSizeError",
    "ConversionError",
    "ConversionInputError",
    "DigestMismatchError",
    "FetchError",
    "FileChangedError",
    "FormatError",
    "HTTPStatusError",
    "InvalidURLError",
    "MalformedResponseError",
    "ManifestDecodeError",
    "ManifestSchemaError",
    "ManifestTooLargeError",
    "MemoryBudgetError",
    "ModelDirectoryError",
    "ModelFileError",
    "NoConfigError",
    "NoTokenizerError",
    "OutOfBoundsError",
    "OverlapError",
    "RetryableError",
    "RuntimeModelError",
    "SourceChangedError",
    "SourceError",
    "StalledError",
    "StreamloadError",
    "UnknownDTypeError",
    "UnreachableError",
    "UnsupportedArchitectureError",
    "UnsupportedVersionError",
    "UsageError",
    "WriterStageError",
]
