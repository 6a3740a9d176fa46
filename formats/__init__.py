"""The streamload container format (.slm): spec in FORMAT.md, layout in constants.

Installed as ``streamload.formats``; imports nothing else of streamload's.
"""

from ..errors import (
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
from .constants import FORMAT_VERSION, MAGIC, Codec, DType, QuantScheme
from .convert import ConversionReport, convert
from .manifest import ChunkEntry, LayerEntry, Manifest, TensorEntry, parse_manifest
from .reader import ModelReader, decompress_chunk, decompress_chunks, read_preamble, verify_chunk, view_tensor
from .summary import summarize_compression, summarize_manifest
from .writer import ModelWriter

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
