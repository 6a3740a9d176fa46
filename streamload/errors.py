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
    ├── ConversionError (ValueError)         a source model cannot be converted
    │   ├── SourceError                      the source folder or file is unreadable or inconsistent
    │   └── UnsupportedArchitectureError     the model type is not one streamload runs
    ├── FetchError (OSError)                 the network or server failed (after retries)
    │   ├── HTTPStatusError                  an unexpected HTTP status
    │   ├── StalledError                     no progress within the read timeout or rate floor
    │   ├── SourceChangedError               the file on the server changed mid-download
    │   └── RetryableError                   one attempt failed; the caller retries (internal)
    │       └── UnreachableError             nobody answers at the address (refused, no route, no such host)
    ├── ModelFileError (OSError)             a local model file cannot be opened (missing, a directory, unreadable)
    ├── DigestMismatchError (ValueError)     the manifest is not the pinned one
    ├── CacheError (OSError)                 the cache is unusable (damage offline, a symbolic link)
    │   └── CacheWriteError                  the cache's disk is full or its directory not writable
    ├── RuntimeModelError (ValueError)       the model or its input cannot be run
    │   └── NoTokenizerError                 text given to a model without a tokenizer
    └── UsageError (ValueError)              an argument to the library is out of its range

Messages say what happened and what to do in the library's own terms (``cache_dir=``, token ids); the CLI adds
the flag or command that does it (``--cache-dir``, ``--ids``, ``streamload rm``), from the class and fields here.
The HTTP paths' internal signals (a 304, a redirect, an error status, a response only aiohttp can read) are
not errors and never reach a caller: they live with the transports, in ``streamload.httputil``.
"""

from __future__ import annotations


class StreamloadError(Exception):
    """Base class of every error streamload raises on purpose."""


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


class SourceError(ConversionError):
    """The source folder or file is missing, unreadable or inconsistent."""


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


class SourceChangedError(FetchError):
    """The file on the server was replaced while it was being downloaded."""


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


class NoTokenizerError(RuntimeModelError):
    """Text was given to a model that has no tokenizer: give token ids instead."""


class UsageError(StreamloadError, ValueError):
    """An argument to the library is out of its range."""


__all__ = [
    "BadMagicError",
    "CacheError",
    "CacheWriteError",
    "ChunkDecodeError",
    "ChunkIntegrityError",
    "ChunkSizeError",
    "ConversionError",
    "DigestMismatchError",
    "FetchError",
    "FormatError",
    "HTTPStatusError",
    "ManifestDecodeError",
    "ManifestSchemaError",
    "ManifestTooLargeError",
    "ModelFileError",
    "NoTokenizerError",
    "OutOfBoundsError",
    "OverlapError",
    "RetryableError",
    "RuntimeModelError",
    "SourceChangedError",
    "SourceError",
    "StalledError",
    "StreamloadError",
    "UnreachableError",
    "UnknownDTypeError",
    "UnsupportedArchitectureError",
    "UnsupportedVersionError",
    "UsageError",
]
