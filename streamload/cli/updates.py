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
    chunks = f" and {result['chunks_whole']} chunks" if result["chunks_whole"] else ""
    parts.append(f"{format_bytes(result['bytes_whole'])} from the model file (the header{chunks})")
    return "update: " + ", ".join(parts) + "; every chunk checked before use"


def conversion_update_fields(report: Any) -> dict[str, Any]:
    """``convert --json`` with --base: the rebasing's rows and error against independent quantization, and the delta."""
    if report.rebase is None:
        return {}
    delta = report.delta
    return {
        "rebase": report.rebase,
        "delta": None
        if delta is None
        else {
            "path": str(delta.path) if delta.path is not None else None,
            "base_digest": delta.base_digest,
            "bytes": delta.size_bytes,
            "file_bytes": delta.file_size_bytes,
            "chunks_shared": delta.chunks_shared,
            "chunks_difference": delta.chunks_difference,
            "chunks_whole": delta.chunks_whole,
            "not_written_because": delta.reason or None,
        },
    }


def describe_conversion_update(report: Any) -> str:
    """Two lines for ``convert --base``: what the base's scales cost, and what a client holding the base fetches."""
    rebase, delta = report.rebase, report.delta
    share = rebase["rows_rebased"] / rebase["rows"] if rebase["rows"] else 0.0
    lines = [
        f"--base {rebase['base']} (sha256:{rebase['base_digest'][:12]}): {rebase['rows_rebased']} of {rebase['rows']} rows "
        f"({100 * share:.1f}%) kept the base's scales; largest error {rebase['max_abs_error']:.3e}, "
        f"against {rebase['independent_max_abs_error']:.3e} quantized independently "
        f"(per matrix at most {rebase['max_abs_error_ratio']:.3f}x abs, {rebase['max_rel_error_ratio']:.3f}x rel; "
        f"bound {rebase['scale_ratio_bound']}x)"
    ]
    if delta is not None and delta.path is not None:
        lines.append(
            f"wrote {delta.path}: {format_bytes(delta.size_bytes)} ({delta.size_bytes / delta.file_size_bytes:.3f} of the new file): "
            f"{delta.chunks_difference} chunks as differences, {delta.chunks_whole} whole, {delta.chunks_shared} shared with the base; "
            "serve it beside the new file"
        )
    elif delta is not None:
        lines.append(f"no delta file: {delta.reason} (a client holding the base copies {delta.chunks_shared} chunks and fetches the rest)")
    return "\n".join(lines)


def is_delta_file(path: str) -> bool:
    from ..formats.delta import DELTA_MAGIC

    try:
        with open(path, "rb") as f:
            return f.read(len(DELTA_MAGIC)) == DELTA_MAGIC
    except OSError:
        return False


def inspect_delta(args: Any) -> int:
    """``inspect`` of a delta file: its base, its entries by method and their bytes."""
    import os

    from ..formats.delta import DELTA_PREAMBLE_SIZE_BYTES, index_size_needed, summarize_delta
    from .output import EXIT_OK, print_json

    with open(args.source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(DELTA_PREAMBLE_SIZE_BYTES)
        data = head + f.read(index_size_needed(head) - len(head))
    summary = summarize_delta(data, size)
    if args.json:
        print_json(summary)
        return EXIT_OK
    methods = summary["by_method"]
    print(args.source)
    print(f"  delta file     {format_bytes(summary['file_bytes'])}, against sha256:{summary['base_digest']}")
    print(f"  index          {summary['entries']} entries, {format_bytes(summary['index_bytes'])}, sha256:{summary['index_sha256']}")
    print(f"  differences    {methods['difference']['chunks']} chunks, {format_bytes(methods['difference']['bytes'])}")
    print(f"  whole chunks   {methods['whole']['chunks']} chunks, {format_bytes(methods['whole']['bytes'])}")
    return EXIT_OK


def delta_bases_of(path: str) -> list[dict[str, Any]]:
    """The delta files a local model file's manifest lists (``inspect``)."""
    from ..formats import ModelReader
    from ..formats.constants import PREAMBLE_SIZE_BYTES
    from ..formats.delta import delta_file_name, read_delta_bases

    with open(path, "rb") as f:
        f.seek(PREAMBLE_SIZE_BYTES)
        with ModelReader(path) as reader:
            manifest_bytes = f.read(reader.preamble.manifest_size_bytes)
            digest = reader.manifest.digest
    from pathlib import Path

    return [
        {"base_digest": b.digest, "file": delta_file_name(Path(path).name, b.digest, digest), "bytes": b.size_bytes}
        for b in read_delta_bases(manifest_bytes)
    ]


def print_delta_bases(bases: list[dict[str, Any]]) -> None:
    for base in bases:
        print(f"  delta          {base['file']} ({format_bytes(base['bytes'])}) for clients holding sha256:{base['base_digest'][:12]}")
