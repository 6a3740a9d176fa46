"""What ``fetch`` and ``run`` say about an update: bytes copied from other cached models, from deltas, and whole."""

from __future__ import annotations

from typing import Any

from .output import format_bytes


def update_fields(stats: Any) -> dict[str, int]:
    """The ``--json`` fields: compressed bytes copied from cached models, bytes of delta files downloaded (and the chunks
    they rebuilt), and the bytes of the model file downloaded (its header and whole chunks)."""
    return {
        "bytes_local": stats.bytes_local,
        "chunks_local": stats.chunks_local,
        "bytes_delta": stats.bytes_delta,
        "chunks_delta": stats.chunks_delta,
        "bytes_whole": stats.bytes_downloaded - stats.bytes_delta,
        "chunks_whole": stats.chunks_fetched,
    }


def describe_update(result: dict[str, Any]) -> str:
    """One line: where the model's bytes came from."""
    parts = []
    if result["chunks_local"]:
        parts.append(f"{format_bytes(result['bytes_local'])} copied from cached models ({result['chunks_local']} chunks)")
    if result["chunks_delta"]:
        parts.append(f"{format_bytes(result['bytes_delta'])} of deltas ({result['chunks_delta']} chunks rebuilt)")
    parts.append(f"{format_bytes(result['bytes_whole'])} whole (the header and {result['chunks_whole']} chunks)")
    return "update: " + ", ".join(parts) + "; every chunk checked before use"
