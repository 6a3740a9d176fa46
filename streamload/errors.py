"""streamload's exceptions: one tree under ``StreamloadError``.

::

    StreamloadError
    ├── FormatError (ValueError)             the bytes of a .slm file are malformed
    │   ├── BadMagicError, UnsupportedVersionError, ManifestTooLargeError, ManifestDecodeError
    │   ├── ManifestSchemaError ── UnknownDTypeError, OutOfBoundsError, OverlapError
    │   ├── ChunkDecodeError ── ChunkSizeError
    │   └── ChunkIntegrityError              a chunk failed its sha256 (every retry did)
    ├── ConversionError (ValueError) ── SourceError, UnsupportedArchitectureError
    ├── FetchError (OSError)                 the network or server failed (after retries)
    │   ├── HTTPStatusError                  an unexpected HTTP status
    │   └── StalledError                     no bytes arrived within the read timeout
    ├── DigestMismatchError (ValueError)     the manifest is not the pinned one
    ├── CacheError (OSError)                 the cache dir is unusable (full disk, permissions)
    └── RuntimeModelError (ValueError)       the model cannot run (unknown architecture, bad input)

The format errors are defined in ``streamload.formats.errors`` (the format
package imports nothing of ours) and re-exported here.
"""

from __future__ import annotations

from .formats.errors import (
    BadMagicError,
    ChunkDecodeError,
    ChunkIntegrityError,
    ChunkSizeError,
    ConversionError,
    FormatError,
    ManifestDecodeError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    OverlapError,
    SourceError,
    StreamloadError,
    UnknownDTypeError,
    UnsupportedArchitectureError,
    UnsupportedVersionError,
)


class FetchError(StreamloadError, OSError):
    """Downloading failed and retrying did not help."""


class HTTPStatusError(FetchError):
    """The server answered with a status we cannot use."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class StalledError(FetchError):
    """No bytes arrived for longer than the read timeout."""


class DigestMismatchError(StreamloadError, ValueError):
    """The manifest's digest differs from the one the caller pinned."""


class CacheError(StreamloadError, OSError):
    """The cache directory cannot be used."""


class RuntimeModelError(StreamloadError, ValueError):
    """The model or its input cannot be run."""


__all__ = [
    "BadMagicError",
    "CacheError",
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
    "OutOfBoundsError",
    "OverlapError",
    "RuntimeModelError",
    "SourceError",
    "StalledError",
    "StreamloadError",
    "UnknownDTypeError",
    "UnsupportedArchitectureError",
    "UnsupportedVersionError",
]
