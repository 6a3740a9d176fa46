"""The tokenizer embedded in a model's manifest: one zstd frame of tokenizer.json, checked, then loaded."""

from __future__ import annotations

from typing import Any

import zstandard

from .errors import FormatError
from .formats.manifest import TokenizerBlob
from .formats.reader import frame_size_bytes

NO_TOKENIZER = "this model has no tokenizer (it was converted from a folder without tokenizer.json): give token ids instead of text"


def load_tokenizer(blob: TokenizerBlob) -> Any:
    """A ``tokenizers.Tokenizer`` from the embedded blob.

    Raises:
        FormatError: the blob is not one zstd frame of the size the manifest says, or not a tokenizer.json.
    """
    from tokenizers import Tokenizer

    try:
        whole_frame = frame_size_bytes(blob.data) == len(blob.data)
    except ValueError:
        whole_frame = False
    if not whole_frame or zstandard.frame_content_size(blob.data) != blob.raw_size_bytes:
        raise FormatError("the embedded tokenizer is not one zstd frame of the size the manifest says")
    text = zstandard.ZstdDecompressor().decompress(blob.data, max_output_size=blob.raw_size_bytes)
    try:
        return Tokenizer.from_str(text.decode("utf-8"))
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        raise FormatError(f"the embedded tokenizer.json cannot be loaded: {exc}") from None
