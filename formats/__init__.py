"""The streamload container format (.slm): spec in FORMAT.md, layout in constants.

Installed as ``streamload.formats``; imports nothing else of streamload's.
"""

from ..errors import (
    BadMagicError,
    ChunkDecodeError,
    ChunkIntegrityError,
    ChunkSizeError,
    ConversionError,
    ConversionInputError,
    FormatError,
    ManifestDecodeError,
    ManifestSchemaError,
    ManifestTooLargeError,
    OutOfBoundsError,
    OverlapError,
    SourceError,  # the old name of ConversionInputError, kept for one release
    StreamloadError,
    UnknownDTypeError,
    UnsupportedArchitectureError,
    UnsupportedVersionError,
)
from .constants import FORMAT_VERSION, MAGIC, Codec, DType, QuantScheme
from .manifest import ChunkEntry, LayerEntry, Manifest, TensorEntry, parse_manifest
from .reader import ModelReader, decompress_chunk, decompress_chunks, read_preamble, verify_chunk, view_tensor
from .summary import summarize_compression, summarize_manifest

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BadMagicError",
    "ChunkDecodeError",
    "ChunkEntry",
    "ChunkIntegrityError",
    "ChunkSizeError",
    "Codec",
    "ConversionError",
    "ConversionReport",
    "DType",
    "FormatError",
    "LayerEntry",
    "Manifest",
    "ManifestDecodeError",
    "ManifestSchemaError",
    "ManifestTooLargeError",
    "ModelReader",
    "ModelWriter",
    "OutOfBoundsError",
    "OverlapError",
    "QuantScheme",
    "ConversionInputError",
    "SourceError",
    "StreamloadError",
    "TensorEntry",
    "UnknownDTypeError",
    "UnsupportedArchitectureError",
    "UnsupportedVersionError",
    "convert",
    "decompress_chunk",
    "decompress_chunks",
    "parse_manifest",
    "read_preamble",
    "summarize_compression",
    "summarize_manifest",
    "verify_chunk",
    "view_tensor",
]

_LAZY = {"ConversionReport": ".convert", "convert": ".convert", "ModelWriter": ".writer"}  # writing side: not imported to read a model


def __getattr__(name: str) -> object:
    """The converter and writer, imported on first use: running a cached model never needs them (about 45 ms of imports)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
