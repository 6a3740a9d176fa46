"""The byte layout of a .slm file, declared once.

FORMAT.md is the prose version of this module: every magic, struct, alignment and
limit of the layout is declared here and nowhere else (other modules compute offsets
only from these and from manifest fields). Everything is little-endian.
"""

from __future__ import annotations

import enum
import struct

MAGIC = b"\x89SLM\r\n\x1a\n"
"""8 bytes. Non-ASCII first byte and CR LF / ^Z / LF catch text-mode mangling (as PNG does)."""

FORMAT_VERSION = 3
"""Bumped only for changes an old reader cannot skip; new manifest keys do not bump it.

Version 2 added row-table layers (``LayerKind.ROWS``): a token-embedding table stored after the
execution steps, in small chunks of whole rows, with its scales in layer 0. Version 3 added
progressive tensors (``coarse_shift``): pass-0 chunks hold their coarse levels, refinement chunks
(``REFINEMENT_PASS``) the corrections that make them exact. The writer writes the lowest version
that describes the file: 2 unless a tensor is progressive."""

READABLE_FORMAT_VERSIONS = (1, 2, 3)
"""A version-1 file is a version-2 file without row-table layers, a version-2 file a version-3 file without
progressive tensors: this reader reads all three."""

PLAIN_FORMAT_VERSION = 2
"""What the writer puts in the preamble of a file with no progressive tensor (a version-2 reader reads it)."""


def written_format_version(progressive: bool) -> int:
    """The version the writer puts in a file's preamble: the oldest that reads it."""
    return FORMAT_VERSION if progressive else PLAIN_FORMAT_VERSION


REFINEMENT_PASS = 1
"""The ``pass`` of a refinement chunk: it turns a range of a progressive tensor's coarse levels into the exact int8
values. Higher passes are reserved: a reader bounds-checks and skips them."""

COARSE_SHIFTS = range(1, 7)
"""A progressive tensor's ``coarse_shift`` s: its coarse plane keeps 8 - s of each int8 value's bits (k = 8 - s)."""

PREAMBLE = struct.Struct(
    "<"
    "8s"  # magic: MAGIC
    "I"  # format_version: FORMAT_VERSION
    "I"  # flags: reserved; a reader of any version refuses a file with a flag set (none is defined)
    "Q"  # manifest_size_bytes: length of the msgpack manifest that follows
    "Q"  # data_offset: start of the data region, align_up(32 + manifest_size_bytes, DATA_ALIGNMENT)
)
PREAMBLE_SIZE_BYTES = PREAMBLE.size  # 32

DATA_ALIGNMENT = 64
"""The data region starts on this boundary in the file (cache-line friendly reads)."""

TENSOR_ALIGNMENT = 64
"""Every tensor's offset in the decompressed layer store is a multiple of this: numpy views are aligned."""

LAYER_ALIGNMENT = 4096
"""Every layer's offset in the layer store is page aligned, so a layer can be mapped and advised alone."""

DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
"""Raw (decompressed) bytes per chunk; chosen with tools/bench_format.py (docs/benchmarks.md, "The file")."""

ROW_CHUNK_ENTRY_BYTES = 100
"""What one chunk adds to the manifest (its msgpack map with a sha256): the cost of a finer row table."""

ROW_CHUNK_EXPECTED_TOKENS = 16
"""Distinct tokens of a typical input, for choosing rows per chunk (``rows_per_chunk``)."""

DEFAULT_ZSTD_LEVEL = 3
"""Levels 1-19 give the same ratio on int8 weights (all-MiniLM-L6-v2: 21.20-21.22 MB at every level), and 3 converts
~10x faster than 19: ``python tools/bench_format.py --levels 1,3,9,19 --source <MiniLM folder>``."""

CHUNK_FIELDS = ("layer", "offset", "size", "raw_offset", "raw_size", "sha256")
"""A chunk entry's required fields (FORMAT.md, "Manifest"), in the order the writer encodes them; the optional
CHUNK_PASS_FIELD and CHUNK_CODEC_FIELD follow only when not their defaults. The reader's column path
(``chunk_entries``) reads exactly this encoding; any other goes entry by entry."""
CHUNK_PASS_FIELD = "pass"
CHUNK_CODEC_FIELD = "codec"

# Limits a reader enforces on untrusted input (FORMAT.md, "Bounds").
MAX_MANIFEST_SIZE_BYTES = 64 << 20
MAX_CHUNK_RAW_SIZE_BYTES = 64 << 20
MAX_CHUNK_SIZE_BYTES = 2 * MAX_CHUNK_RAW_SIZE_BYTES
"""A chunk's compressed ``size``: zstd's worst case on incompressible data is a few bytes per 128 KiB block over raw."""
MAX_STORE_SIZE_BYTES = 1 << 40
"""The layer store: every layer's end, every offset and every tensor dimension is at most this."""
MAX_TENSOR_NDIM = 8
MAX_NAME_LENGTH = 1024
"""Characters of a layer's or tensor's name (and of a scales reference)."""
MAX_PASS = 255
"""A chunk's ``pass``: 0 and REFINEMENT_PASS are read, higher ones bounds-checked and skipped."""
MAX_TOKENIZER_SIZE_BYTES = 64 << 20
SHA256_SIZE_BYTES = 32

# Bounds on what a manifest may hold, so that parsing one costs a small multiple of its bytes
# (msgpack turns a 1-byte empty map into a ~64-byte Python dict). Values are measured in
# encoded bytes before they are decoded; unknown root keys are skipped without decoding.
MAX_MAP_FIELDS = 256
"""Keys of the root map, of a tensors/layers/chunks entry, of the tokenizer and stats maps."""
MAX_CONFIG_SIZE_BYTES = 64 << 10
MAX_ENTRY_SIZE_BYTES = 16 << 10
"""One layers/tensors/chunks entry, unknown fields included."""
MAX_UNKNOWN_VALUE_SIZE_BYTES = 16 << 20
"""The value of a root key this reader does not know (skipped, never decoded)."""
MIN_ZSTD_FRAME_SIZE_BYTES = 9
"""The smallest zstd frame (6-byte header, 3-byte block header): bounds the chunk count by the data size."""

# What a file may claim against what it is: a zstd frame of zeros decodes to ~5,000 times its size, so chunks that
# each respect their own bounds could declare a store of terabytes from a few megabytes on the wire.
MAX_STORE_PER_COMPRESSED_BYTE = 16
"""The layer store (the last layer's end) is at most this many times the compressed bytes of the chunks a reader fetches
(pass 0 and refinements), plus STORE_ALLOWANCE_BYTES. Real models: 1.03-1.11 (int8 weights compress ~1.1x:
all-MiniLM-L6-v2 1.09, a 1B Llama 1.11, their progressive files 1.08); a store 16 times its chunks would be >90% bytes
that compress to nothing."""
STORE_ALLOWANCE_BYTES = 64 << 20
"""Store bytes any file may have beyond the ratio: a small model's layer alignment (tests/formats/golden/tiny.slm is 47
times its 175 chunk bytes) or a few zero-filled tensors."""


class DType(enum.Enum):
    """Element types a tensor may have; the value is the manifest spelling."""

    F32 = "f32"
    F16 = "f16"
    I8 = "i8"

    @property
    def numpy_name(self) -> str:
        return _NUMPY_NAMES[self]

    @property
    def size_bytes(self) -> int:
        return _ITEM_SIZES[self]


_NUMPY_NAMES = {DType.F32: "<f4", DType.F16: "<f2", DType.I8: "i1"}
_ITEM_SIZES = {DType.F32: 4, DType.F16: 2, DType.I8: 1}


class QuantScheme(enum.Enum):
    """How a tensor's stored values map to real numbers."""

    NONE = "none"  # stored values are the real values
    INT8_ROW = "int8_row"  # real[r, :] = stored[r, :] * scales[r]; scales is an f32 tensor of shape (rows,)


class LayerKind(enum.Enum):
    """What a layer is for; the value is the manifest spelling."""

    STEP = "step"  # an execution step: embeddings, a block, the head (in forward-pass order)
    ROWS = "rows"  # a row table (one 2-D tensor) read a few rows at a time; stored after every step


class Codec(enum.Enum):
    """How a chunk's bytes are encoded in the data region."""

    ZSTD = "zstd"  # one zstd frame whose header carries the raw size


def rows_per_chunk(rows: int, row_size_bytes: int, compression_ratio: float = 1.0) -> int:
    """Rows per chunk of a row table: the fewest manifest bytes plus bytes fetched for a typical input.

    A table of ``rows`` cut into chunks of r rows costs ``rows / r * ROW_CHUNK_ENTRY_BYTES`` of manifest,
    which every client reads, and each of an input's ROW_CHUNK_EXPECTED_TOKENS distinct tokens fetches a
    whole chunk, ``r * row_size_bytes / compression_ratio``; the sum is least at the r below
    (all-MiniLM-L6-v2: 22 rows of 384 bytes; ``python tools/bench_row_chunks.py`` measures the curve).
    """
    fetched_per_row = max(1.0, row_size_bytes / compression_ratio) * ROW_CHUNK_EXPECTED_TOKENS
    return max(1, min(rows, round((rows * ROW_CHUNK_ENTRY_BYTES / fetched_per_row) ** 0.5)))


def align_up(value: int, alignment: int) -> int:
    """Round value up to a multiple of alignment (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


# ---------------------------------------------------------------- delta files (FORMAT.md, "Delta files")

DELTA_MAGIC = b"\x89SLD\r\n\x1a\n"
"""8 bytes, as the model file's MAGIC with D for delta."""

DELTA_VERSION = 1

DELTA_PREAMBLE = struct.Struct(
    "<"
    "8s"  # magic: DELTA_MAGIC
    "I"  # version: DELTA_VERSION
    "I"  # flags: 0 (a reader rejects unknown flags)
    "Q"  # entry_count: entries after the preamble
    "32s"  # base_digest: sha256 of the base model's manifest bytes
)
DELTA_PREAMBLE_SIZE_BYTES = DELTA_PREAMBLE.size  # 56

DELTA_ENTRY = struct.Struct(
    "<"
    "I"  # chunk_index: the new model's pass-0 chunk this entry rebuilds (ascending)
    "I"  # method: DeltaMethod
    "Q"  # base_raw_offset: DIFFERENCE: where the chunk's base bytes start in the base's layer store; WHOLE: 0
    "Q"  # offset: of the entry's zstd frame, from data_offset
    "Q"  # size: the frame's bytes
    "32s"  # sha256: DIFFERENCE: of the rebuilt raw chunk; WHOLE: of the frame (the chunk's sha256 in the manifest)
)
DELTA_ENTRY_SIZE_BYTES = DELTA_ENTRY.size  # 64

MAX_DELTA_ENTRIES = 1 << 24
"""Entries a reader accepts (16 M: a 1 GiB index)."""

DELTA_SUFFIX = ".slmd"


class DeltaMethod(enum.IntEnum):
    """How a delta entry's frame rebuilds its chunk."""

    WHOLE = 0  # the chunk's own zstd frame, as in the new model's file
    DIFFERENCE = 1  # zstd of (new raw - base raw) mod 256, byte by byte, over the chunk's range


def delta_index_size(entry_count: int) -> int:
    """Bytes of a delta file's index: its preamble and ``entry_count`` entries (what ``index_sha256`` covers)."""
    return DELTA_PREAMBLE_SIZE_BYTES + entry_count * DELTA_ENTRY_SIZE_BYTES


def delta_data_offset(entry_count: int) -> int:
    """Where a delta file's frames start: after the index, DATA_ALIGNMENT-aligned."""
    return align_up(delta_index_size(entry_count), DATA_ALIGNMENT)
