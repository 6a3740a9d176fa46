"""The root of streamload's exception tree and the errors of the container format.

The whole tree (client errors live in ``streamload.errors``)::

    StreamloadError
    ├── FormatError (ValueError)            a .slm file or manifest is malformed
    │   ├── BadMagicError                   not a .slm file
    │   ├── UnsupportedVersionError         written by a newer streamload
    │   ├── ManifestTooLargeError           manifest over the reader's cap
    │   ├── ManifestDecodeError             manifest is not valid msgpack
    │   ├── ManifestSchemaError             a field is missing, mistyped or out of range
    │   │   ├── UnknownDTypeError           a tensor dtype this reader does not know
    │   │   ├── OutOfBoundsError            an offset or size points outside the file or store
    │   │   └── OverlapError                two chunks or tensors share bytes
    │   ├── ChunkDecodeError                a chunk is not one well-formed zstd frame
    │   │   └── ChunkSizeError              a chunk decompresses to other than its declared size
    │   └── ChunkIntegrityError             a chunk's sha256 differs from the manifest
    ├── ConversionError (ValueError)        a source model cannot be converted
    │   ├── SourceError                     the source folder or file is unreadable or inconsistent
    │   └── UnsupportedArchitectureError    the model type is not one streamload runs
    └── (client side, streamload.errors) FetchError, DigestMismatchError, CacheError, ...
"""

from __future__ import annotations


class StreamloadError(Exception):
    """Base class of every error streamload raises on purpose."""


class FormatError(StreamloadError, ValueError):
    """A .slm file or manifest is malformed."""


class BadMagicError(FormatError):
    """The file does not start with the .slm magic bytes."""


class UnsupportedVersionError(FormatError):
    """The file's format version is newer than this reader."""


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


class ConversionError(StreamloadError, ValueError):
    """A source model cannot be converted."""


class SourceError(ConversionError):
    """The source folder or file is missing, unreadable or inconsistent."""


class UnsupportedArchitectureError(ConversionError):
    """The source's model type is not one streamload can run."""
