"""The tokenizer embedded in a model's manifest: one zstd frame of tokenizer.json, checked, then loaded.

The file may be hostile: whatever is wrong with the blob is a one-line ``FormatError`` when it is loaded, including
settings on which the Rust ``tokenizers`` library panics while encoding (read back from the loaded tokenizer and
checked before anything is encoded), and any other panic on a probe text encoded at load. Loading costs the library's
own parse and one probe encode: the settings checked are read from the tokenizer, not from a second parse of the JSON
(~10 ms for a 700 KB tokenizer.json, a twentieth of a cached run's cold start).
"""

from __future__ import annotations

import json
from typing import Any

import zstandard

from .errors import FormatError
from .formats.manifest import TokenizerBlob
from .formats.reader import frame_size_bytes

PROBE_TEXT = "Streamload checks its tokenizer: 12,345 words, é, 日本語, 🙂."  # encoded once at load: a panic here is a FormatError
NO_TOKENIZER = "this model has no tokenizer (it was converted from a folder without tokenizer.json): give token ids instead of text"


def load_tokenizer(blob: TokenizerBlob) -> Any:
    """A ``tokenizers.Tokenizer`` from the embedded blob.

    Raises:
        FormatError: the blob is not one zstd frame of the size the manifest says, its blocks are damaged, or it is not
            a tokenizer.json the ``tokenizers`` library loads (a panic in that Rust library included: pyo3 raises
            ``PanicException``, a BaseException, which is caught here by name as it cannot be imported).
    """
    from tokenizers import Tokenizer

    try:
        whole_frame = frame_size_bytes(blob.data) == len(blob.data)
    except ValueError:
        whole_frame = False
    if not whole_frame or zstandard.frame_content_size(blob.data) != blob.raw_size_bytes:
        raise FormatError("the embedded tokenizer is not one zstd frame of the size the manifest says")
    try:
        text = zstandard.ZstdDecompressor().decompress(blob.data, max_output_size=blob.raw_size_bytes).decode("utf-8")
    except (zstandard.ZstdError, UnicodeDecodeError) as exc:
        raise FormatError(f"the embedded tokenizer is damaged ({_first_line(exc)}); convert the model again") from None
    try:
        tokenizer = Tokenizer.from_str(text)  # loading does not panic on the settings below; encoding does
        problem = _panicking_setting(tokenizer)
        if problem is None:
            tokenizer.encode(PROBE_TEXT)
            return tokenizer
    except Exception as exc:  # tokenizers raises plain Exception on bad JSON
        raise FormatError(f"the embedded tokenizer.json cannot be loaded: {_first_line(exc)}") from None
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise FormatError(f"the embedded tokenizer.json made the tokenizers library fail: {_first_line(exc)}") from None
    raise FormatError(f"the embedded tokenizer.json cannot be used: {problem}")


def _first_line(exc: BaseException) -> str:
    """An error's message as one line (a Rust panic's may span several)."""
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _panicking_setting(tokenizer: Any) -> str | None:
    """A setting of a loaded tokenizer on which ``tokenizers`` panics when encoding rather than refusing the file, or None.

    Truncation with a stride not under its max length (encoding.rs asserts it on the first long input), and a
    template post-processor naming a special token it does not define (template.rs indexes its map).
    """
    truncation = tokenizer.truncation
    if isinstance(truncation, dict):
        stride, max_length = truncation.get("stride", 0), truncation.get("max_length")
        if isinstance(stride, int) and isinstance(max_length, int) and stride >= max_length:
            return f"its truncation stride ({stride}) is not under its max_length ({max_length})"
    processor = tokenizer.post_processor
    if processor is None:
        return None
    for template in _post_processors(json.loads(processor.__getstate__())):  # the post-processor alone: a small JSON
        if template.get("type") != "TemplateProcessing":
            continue
        defined = template.get("special_tokens") if isinstance(template.get("special_tokens"), dict) else {}
        for piece in [*(template.get("single") or []), *(template.get("pair") or [])]:
            special = piece.get("SpecialToken") if isinstance(piece, dict) else None
            if isinstance(special, dict) and special.get("id") not in defined:
                return f"its template names the special token {str(special.get('id'))[:40]!r}, which it does not define"
    return None


def _post_processors(processor: object) -> list[dict[str, Any]]:
    """A post-processor and those of a Sequence of them."""
    if not isinstance(processor, dict):
        return []
    if processor.get("type") == "Sequence" and isinstance(processor.get("processors"), list):
        return [p for inner in processor["processors"] for p in _post_processors(inner)]
    return [processor]
