"""The commands on a local file or directory: ``convert``, ``inspect``, ``verify``, ``serve``."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import sys
from pathlib import Path
from typing import Any

from ..formats import ModelReader, summarize_manifest
from ..formats.constants import DEFAULT_ZSTD_LEVEL
from .cached import cache_dir_of, is_url, request_headers
from .output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConvertProgress, format_bytes, print_json, print_summary
from .updates import conversion_update_fields, delta_bases_of, describe_conversion_update, inspect_delta, is_delta_file, print_delta_bases


def cmd_convert(args: argparse.Namespace) -> int:
    from ..formats import convert  # the writing side, imported only to convert

    calibrator = None
    if args.progressive:
        from ..calibrate import CalibratedShifts  # runs the runtime: imported only for a progressive conversion

        calibrator = CalibratedShifts

    if args.level is not None:
        print("warning: convert --level is deprecated and will be removed: levels above 3 gain nothing on int8 weights", file=sys.stderr)
    if not args.output.endswith(".slm"):
        print(f"warning: {args.output} does not end in .slm: `streamload serve` serves only .slm files", file=sys.stderr)
    bar = ConvertProgress(f"converting {Path(args.source).name}", enabled=not args.json and sys.stderr.isatty())
    try:
        report = convert(
            args.source,
            args.output,
            quant=args.quant,
            zstd_level=DEFAULT_ZSTD_LEVEL if args.level is None else args.level,
            chunk_size_bytes=args.chunk_size,
            config_path=args.config,
            progress=bar,
            progressive=args.progressive,
            calibrator=calibrator,
            base=args.base,
        )
    finally:
        bar.close()
    if args.json:
        summary = summarize_manifest(report.manifest)
        summary |= {
            "path": str(report.path),
            "source_bytes": report.source_size_bytes,
            "output_bytes": report.output_size_bytes,
            "seconds": report.seconds,
        }
        summary |= conversion_update_fields(report)
        summary["tensors"] = [
            {
                "name": t.name,
                "layer": t.layer_index,
                "shape": list(t.shape),
                "dtype": t.stored_dtype,
                "max_abs_error": t.max_abs_error,
                "max_rel_error": t.max_rel_error,
            }
            for t in report.tensors
        ]
        print_json(summary)
        return EXIT_OK
    if args.tensor_table:
        print(f"{'tensor':<56} {'layer':>5} {'shape':>14} {'dtype':>7} {'max abs err':>12} {'max rel err':>12}")
        for t in report.tensors:
            errors = f"{t.max_abs_error:12.3e} {t.max_rel_error:12.3e}" if t.max_abs_error is not None else f"{'-':>12} {'-':>12}"
            print(f"{t.name:<56} {t.layer_index:>5} {'x'.join(map(str, t.shape)):>14} {t.stored_dtype:>7} {errors}")
        print()
    ratio = report.output_size_bytes / report.source_size_bytes
    manifest = report.manifest
    chunks = len(manifest.file_order_chunks())
    print(
        f"wrote {report.path}: {format_bytes(report.output_size_bytes)} from {format_bytes(report.source_size_bytes)} "
        f"({ratio:.3f}x) in {report.seconds:.2f} s; largest error abs {report.max_abs_error:.3e}, rel {report.max_rel_error:.3e}\n"
        f"{manifest.architecture}, {len(manifest.layers)} layers, {len(report.tensors)} tensors, {chunks} chunks, "
        f"digest sha256:{manifest.digest[:12]} (per tensor: convert --verbose; per layer: streamload inspect {report.path})"
    )
    if report.rebase is not None:
        print(describe_conversion_update(report))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    if not is_url(args.source) and is_delta_file(args.source):
        return inspect_delta(args)
    if not is_url(args.source) and not Path(args.source).exists():  # a cached model's name or digest: its cached header
        from ..cache.listing import one_cached_model
        from ..formats.reader import read_header

        cached = one_cached_model(cache_dir_of(args), args.source)
        if cached.header is None:
            print(f"error: cached model {cached.digest[:12]} has no header yet: fetch it again", file=sys.stderr)
            return EXIT_FAILURE
        preamble, manifest = read_header(cached.header, None)
        summary = summarize_manifest(manifest, format_version=preamble.format_version)
        summary["file_bytes"] = preamble.data_offset + manifest.data_size_bytes
    elif is_url(args.source):
        manifest, size = asyncio.run(_read_url_or_cached_header(args))
        summary = summarize_manifest(manifest)
        summary["file_bytes"] = size
    else:
        with ModelReader(args.source) as reader:
            summary = summarize_manifest(reader.manifest, format_version=reader.preamble.format_version)
            summary["file_bytes"] = reader.size_bytes
    summary["deltas"] = delta_bases_of(args.source) if not is_url(args.source) and Path(args.source).is_file() else []
    if args.json:
        print_json(summary)
    else:
        print_summary(summary, args.source)
        print_delta_bases(summary["deltas"])
    return EXIT_OK


async def _read_url_or_cached_header(args: argparse.Namespace) -> tuple[Any, int]:
    """The URL's manifest and file size; when nobody answers there, the header its model left in the cache (as `run`
    falls back to the cached copy), with a warning."""
    from ..cache.model_cache import ModelCache
    from ..cache.refs import read_ref
    from ..download.header import parse_header
    from ..download.origin import split_pin
    from ..errors import FetchError
    from ..model import read_remote_header

    url, _ = split_pin(args.source, None)
    digest = read_ref(cache_dir_of(args), url)
    raw = ModelCache(cache_dir_of(args), digest).read_header() if digest else None
    try:
        return await read_remote_header(args.source, headers=request_headers(args), give_up_unreachable=raw is not None)
    except FetchError as exc:
        if raw is None:
            raise
        header = await parse_header(raw, None)
        if header.manifest.digest != digest:  # the directory holds another model's header: not this URL's copy
            raise
        print(f"warning: {exc}; showing the cached copy sha256:{header.manifest.digest[:12]}", file=sys.stderr)
        return header.manifest, header.data_offset + header.manifest.data_size_bytes


# ---------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    if is_url(args.file) or not Path(args.file).exists():  # a URL or a cached model's name: the file it came from
        from ..cache.listing import find_cached_models, one_cached_model

        if is_url(args.file) and not find_cached_models(cache_dir_of(args), args.file):
            print(
                f"error: verify checks a local file; to check {args.file}, `streamload fetch` it (every chunk is verified)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        cached = one_cached_model(cache_dir_of(args), args.file)
        files = [s for s in cached.sources if not is_url(s) and Path(s).is_file()]
        if not files:
            print(
                f"error: {args.file} is the cached model {cached.digest[:12]}, downloaded from a URL: verify checks a file; "
                f"`streamload fetch {args.file}` checks every chunk's sha256 as it lands",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        print(f"verifying {files[0]} (the file cached model {cached.digest[:12]} came from)", file=sys.stderr)
        args.file = files[0]
    with ModelReader(args.file) as reader:
        problems = reader.verify()
        checked = len(reader.manifest.chunks) + len(reader.manifest.refinement_chunks)
        digest = reader.manifest.digest
    if args.json:
        print_json(
            {"path": args.file, "ok": not problems, "chunks": checked, "bad_chunks": [str(p) for p in problems], "manifest_digest": digest}
        )
    else:
        for problem in problems:
            print(f"BAD  {problem}")
        print(f"{args.file}: {checked - len(problems)}/{checked} chunks verified" + ("" if problems else ", intact"))
    return EXIT_OK if not problems else EXIT_FAILURE


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    if not Path(args.directory).is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return EXIT_FAILURE
    try:  # bound before the server's imports (aiohttp): a port in use is said at once, not after them
        sock = socket.create_server((args.host, args.port), backlog=1024)
    except OSError as exc:
        return _cannot_listen(args, exc)
    from ..server import ServerConfig, run_server

    if not any(Path(args.directory).glob("*.slm")):
        print(f"warning: {args.directory} holds no .slm files: every model request will get 404", file=sys.stderr)
    logging.getLogger("streamload.server.access").setLevel(logging.INFO)
    config = ServerConfig(
        directory=Path(args.directory),
        rate_bytes_per_s=args.rate,
        latency_ms=args.latency_ms,
        ranges_enabled=not args.no_ranges,
    )
    try:
        run_server(
            config, host=args.host, port=args.port, announce=lambda line: print(line, flush=True), access_log=not args.quiet, sock=sock
        )
    except OSError as exc:
        return _cannot_listen(args, exc)
    return EXIT_OK


def _cannot_listen(args: argparse.Namespace, exc: OSError) -> int:
    if exc.errno == errno.EADDRINUSE:
        reason = "the port is in use (another server?); pick another with --port, or --port 0 for any free one"
    else:
        reason = exc.strerror or str(exc)
    print(f"error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
    return EXIT_FAILURE
