"""The ``streamload`` command line: the only place that prints or exits (the library only logs)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .cache import default_cache_dir
from .errors import StreamloadError, UsageError
from .formats import ModelReader, summarize_manifest
from .formats.constants import MAX_CHUNK_RAW_SIZE_BYTES
from .httputil import parse_header_option

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (bad file, network, integrity)
EXIT_USAGE = 2  # argparse's own code for bad arguments
TOKEN_ENV = "STREAMLOAD_TOKEN"  # a bearer token for private models, as HF_TOKEN is for huggingface_hub
HEADER_HELP = (
    "an extra request header, as curl -H takes it: 'Authorization: Bearer TOKEN' (repeat for more); "
    "sent to the URL's own host only, never to a redirect target on another host. "
    f"${TOKEN_ENV}, when set, is sent as 'Authorization: Bearer ${TOKEN_ENV}' unless --header gives an Authorization"
)


class _VersionAction(argparse.Action):
    """``--version``: the package metadata is read only when asked (importlib.metadata costs ~20 ms of every start)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help="show the version and exit")

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        from . import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


def format_bytes(size: float) -> str:
    """SI units (1 MB = 10^6 B), the ones the progress bar shows too."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---------------------------------------------------------------- convert


class ConvertProgress:
    """A bar over the source's bytes on a terminal's stderr, fed by ``convert``'s progress callback."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, done_bytes: int, total_bytes: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=self.label, file=sys.stderr, **_bar_width()
            )
        self.bar.n = min(done_bytes, total_bytes)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.enabled = False  # closed for good: later progress (completing the cache after the result) draws nothing


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import convert  # the writing side, imported only to convert

    bar = ConvertProgress(f"converting {Path(args.source).name}", enabled=not args.json and sys.stderr.isatty())
    try:
        report = convert(
            args.source,
            args.output,
            quant=args.quant,
            zstd_level=args.level,
            chunk_size_bytes=args.chunk_size,
            config_path=args.config,
            progress=bar,
            progressive=args.progressive,
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
        _print_json(summary)
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
        f"digest sha256:{manifest.digest[:12]} (per-tensor table: --verbose, or `streamload inspect {report.path}`)"
    )
    return EXIT_OK


# ---------------------------------------------------------------- inspect


def _print_summary(summary: dict[str, Any], source: str) -> None:
    config = summary["config"]
    print(f"{source}")
    print(
        f"  architecture   {summary['architecture']} ({config.get('num_hidden_layers')} blocks, "
        f"hidden {config.get('hidden_size')}, quant {config.get('quantization', '?')})"
    )
    print(f"  manifest       {format_bytes(summary['manifest_bytes'])}, digest sha256:{summary['manifest_digest']}")
    print(f"  tokenizer      {format_bytes(summary['tokenizer_bytes']) if summary['tokenizer_bytes'] else 'none'}")
    print(
        f"  data           {format_bytes(summary['data_bytes'])} in {summary['chunks']} chunks "
        f"of <= {format_bytes(summary['chunk_size_bytes'])}"
    )
    if summary["size_vs_fp32"] is not None:
        print(f"  size vs fp32   {summary['size_vs_fp32']:.3f} (fp32 weights would be {format_bytes(summary['fp32_equivalent_bytes'])})")
    print(f"\n  {'#':>3} {'layer':<12} {'tensors':>7} {'chunks':>6} {'raw':>11} {'compressed':>11} {'ratio':>6}")
    for layer in summary["layers"]:
        print(
            f"  {layer['index']:>3} {layer['name']:<12} {layer['tensors']:>7} {layer['chunks']:>6} "
            f"{format_bytes(layer['raw_bytes']):>11} {format_bytes(layer['compressed_bytes']):>11} {layer['ratio']:>6.3f}"
        )
    q = summary["quantization"]
    print(f"\n  quantization   {q['tensors_int8']} int8 tensors (per-row scales), {q['tensors_float']} float")
    if q["tensors_int8"]:
        print(f"                 largest error abs {q['max_abs_error']:.3e}, rel {q['max_rel_error']:.3e} ({q['worst_tensor']})")
    tiers = summary["progressive"]
    if tiers:
        cosine = tiers["preview_cosine_on_calibration"]
        print(
            f"  progressive    preview tier {format_bytes(tiers['coarse_tier_bytes'])} (steps at coarse levels), "
            f"refinements {format_bytes(tiers['refinement_bytes'])}, row tables {format_bytes(tiers['row_table_bytes'])}\n"
            f"                 {tiers['progressive_matrices']} matrices progressive "
            f"({', '.join(f'{n} at {bits}' for bits, n in tiers['coarse_bits'].items())}), {tiers['exact_matrices']} exact in pass 0"
            + (f"; preview cosine to exact {cosine:.4f} on the calibration text" if cosine is not None else "")
        )
    payload = summary["int8_payload"]
    if payload:
        print(
            f"  int8 payload   {format_bytes(payload['compressed_bytes'])} compressed; "
            f"order-0 entropy {payload['entropy_bits_per_weight']:.3f} bits/weight, "
            f"bound {format_bytes(payload['entropy_bound_bytes'])}: {100 * payload['above_bound']:+.2f}% vs bound"
        )


def open_model(args: argparse.Namespace, progress: Any) -> Any:
    """``streamload.open`` with the options ``fetch`` and ``run`` share."""
    from . import model as streamload_model

    return streamload_model.open(
        args.source,
        cache_dir=cache_dir_of(args),
        digest=args.digest,
        connections=args.connections,
        progress=progress,
        headers=request_headers(args),
        mirrors=args.mirror or (),
    )


def request_headers(args: argparse.Namespace) -> dict[str, str]:
    """The --header options, then ``$STREAMLOAD_TOKEN`` as a bearer token when no Authorization header was given."""
    headers = dict(args.header or [])
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not any(name.lower() == "authorization" for name in headers):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _header_option(text: str) -> tuple[str, str]:
    try:
        return parse_header_option(text)
    except StreamloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.source.startswith(("http://", "https://")):
        from .model import read_remote_header

        manifest, size = asyncio.run(read_remote_header(args.source, headers=request_headers(args)))
        summary = summarize_manifest(manifest)
        summary["file_bytes"] = size
    else:
        with ModelReader(args.source) as reader:
            summary = summarize_manifest(reader.manifest)
            summary["file_bytes"] = reader.size_bytes
    if args.json:
        _print_json(summary)
    else:
        _print_summary(summary, args.source)
    return EXIT_OK


# ---------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    with ModelReader(args.file) as reader:
        problems = reader.verify()
        checked = len(reader.manifest.chunks) + len(reader.manifest.refinement_chunks)
        digest = reader.manifest.digest
    if args.json:
        _print_json(
            {"path": args.file, "ok": not problems, "chunks": checked, "bad_chunks": [str(p) for p in problems], "manifest_digest": digest}
        )
    else:
        for problem in problems:
            print(f"BAD  {problem}")
        print(f"{args.file}: {checked - len(problems)}/{checked} chunks verified" + ("" if problems else ", intact"))
    return EXIT_OK if not problems else EXIT_FAILURE


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    import socket

    if not Path(args.directory).is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return EXIT_FAILURE
    try:  # bound before the server's imports (aiohttp): a port in use is said at once, not after them
        sock = socket.create_server((args.host, args.port), backlog=1024)
    except OSError as exc:
        return _cannot_listen(args, exc)
    from .server import ServerConfig, run_server

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


# ---------------------------------------------------------------- fetch


class ProgressBar:
    """An `ollama pull`-style bar on stderr, fed by the download progress callback."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, progress: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=progress.bytes_total or progress.bytes_cached + progress.bytes_to_download,  # a resumed bar goes on out of the whole
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=self.label,
                file=sys.stderr,
                **_bar_width(),
            )
        done = progress.bytes_cached + progress.bytes_downloaded
        self.bar.n = min(done, self.bar.total or done)
        # in the description, not the postfix: a narrow terminal drops the postfix first
        self.bar.set_description_str(f"{self.label} layers {progress.layers_ready}/{progress.layers_total}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.enabled = False  # closed for good: later progress (completing the cache after the result) draws nothing


def _bar_width() -> dict[str, Any]:
    """Follow the terminal's width. A terminal that reports a size of 0 x 0 (``script``, some CI ptys) gets 80 x 24:
    tqdm draws nothing in zero rows."""
    import os

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}


def cache_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


# host[:port]/path, the way a URL reads without its scheme ("127.0.0.1:8800/minilm.slm", "cdn.example/m.slm")
_SCHEMELESS_URL = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)(:\d+)?/")


def resolve_source(args: argparse.Namespace, verb: str) -> bool:
    """Let SOURCE name a cached model the way `streamload list` shows it: a digest prefix or a file name.

    A URL or an existing path is used as given. Otherwise SOURCE is looked up in the cache; one match becomes its
    URL pinned to its digest (a complete copy then needs no network) and stderr says which model it is.
    False (after a one-line error) when nothing fits.
    """
    from .cachedir import list_cached_models

    source = args.source
    if is_url(source) or Path(source).exists():
        return True
    root = cache_dir_of(args)
    cached = list_cached_models(root)
    by_name = [m for m in cached if {source, source + ".slm"} & {_file_name(url) for url in m.sources}]
    prefix = source.lower().removeprefix("sha256:")
    by_digest = [m for m in cached if m.digest.startswith(prefix)] if re.fullmatch(r"[0-9a-f]{4,64}", prefix) else []
    matches = by_name or by_digest
    if len(matches) > 1:
        names = ", ".join(m.digest[:12] for m in matches)
        print(f"error: {source!r} matches {len(matches)} cached models ({names}); give more of the digest", file=sys.stderr)
        return False
    if not matches:
        hint = f"; did you mean http://{source} ?" if _SCHEMELESS_URL.match(source) and not source.startswith("/") else ""
        print(f"error: {source}: no such file, and no cached model of that name or digest in {root}{hint}", file=sys.stderr)
        return False
    model = matches[0]
    if not model.sources:
        print(f"error: cached model {model.digest[:12]} came from a local file, not a URL: give that file's path", file=sys.stderr)
        return False
    if args.digest is not None and args.digest.lower().removeprefix("sha256:") != model.digest:
        print(f"error: {source!r} is the cached model {model.digest[:12]}, not --digest {args.digest}", file=sys.stderr)
        return False
    url = model.sources[0]
    status = "complete" if model.complete else "partial: the rest comes from its URL"
    print(f"{verb} cached {_file_name(url)} sha256:{model.digest[:12]} ({status}) from {url}", file=sys.stderr)
    args.source, args.digest = url, model.digest
    return True


def _file_name(url: str) -> str:
    return url.split("#")[0].rstrip("/").rsplit("/", 1)[-1]


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:

    bar = ProgressBar(f"pulling {Path(args.source.split('#')[0]).name}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with open_model(args, bar) as model:
            stats = await model.wait_complete()
            return {
                "path": str(model.path),
                "manifest_digest": model.digest,
                "architecture": model.manifest.architecture,
                "bytes_downloaded": stats.bytes_downloaded,
                "bytes_total": stats.bytes_total,
                "seconds": stats.seconds,
                "chunks_total": stats.chunks_total,
                "chunks_cached": stats.chunks_cached,
                "chunks_fetched": stats.chunks_fetched,
                "retries": stats.retries,
                "integrity_failures": stats.integrity_failures,
                "bytes_by_source": dict(stats.bytes_by_source),
            }
    finally:
        bar.close()


def cmd_fetch(args: argparse.Namespace) -> int:
    if not resolve_source(args, "fetching"):
        return EXIT_FAILURE
    result = asyncio.run(_fetch(args))
    if args.json:
        print(json.dumps(result))
    elif not is_url(args.source):
        print(
            f"{result['architecture']} model sha256:{result['manifest_digest'][:12]} ready in {result['path']}\n"
            f"copied from the local file {args.source}, every chunk verified "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) in {result['seconds']:.2f} s"
        )
    else:
        rate = result["bytes_downloaded"] / result["seconds"] if result["seconds"] > 0 else 0.0
        print(
            f"{result['architecture']} model sha256:{result['manifest_digest'][:12]} ready in {result['path']}\n"
            f"downloaded {format_bytes(result['bytes_downloaded'])} of {format_bytes(result['bytes_total'])} "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) "
            f"in {result['seconds']:.2f} s ({format_bytes(rate)}/s)"
        )
        if len(args.mirror or ()) > 0:  # each source's share; a refused or dead mirror sent nothing
            for url in dict.fromkeys(u.split("#")[0] for u in [args.source, *args.mirror]):
                print(f"  {format_bytes(result['bytes_by_source'].get(url, 0)):>10} from {url}")
    return EXIT_OK


# ---------------------------------------------------------------- run


DECODER_DEFAULTS = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0}  # None in args: not given


def check_run_options(args: argparse.Namespace, config: Any) -> None:
    """What argparse cannot know before the model's manifest is read: decoder-only options, ids within the vocabulary.

    Raises:
        UsageError: an option does not fit this model (exit status 2, as argparse's own errors).
    """
    architecture = config.get("architecture", "?")
    if architecture != "llama":
        given = [f"--{name.replace('_', '-')}" for name in (*DECODER_DEFAULTS, "save_logits") if getattr(args, name) is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} a decoder; this model is a {architecture} encoder"
            )
    for name, default in DECODER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    vocab_size = config.get("vocab_size")
    if args.ids is not None and isinstance(vocab_size, int):
        outside = [i for i in args.ids if i >= vocab_size]
        if outside:
            raise UsageError(f"--ids: token id {outside[0]} is outside this model's vocabulary (ids 0..{vocab_size - 1})")


async def _run(args: argparse.Namespace) -> None:
    """Run the model on the input, print the result as soon as it exists, then (unless --no-finish) let the download
    complete the cache, so that the next run needs no network."""
    import time

    import numpy as np

    from .runtime import run_progressive

    started = time.perf_counter()
    bar = ProgressBar(f"streaming {Path(args.source.split('#')[0]).name}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with open_model(args, bar) as model:
            check_run_options(args, model.config)
            if args.progressive and not model.progressive:
                print(f"warning: {args.source} was not converted with --progressive: no preview, only the exact result", file=sys.stderr)
            options = {
                "texts": args.text,
                "ids": args.ids,
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
                "keep_prompt_logits": bool(args.save_logits),
                "started": started,
            }
            preview: dict[str, Any] | None = None
            results = run_progressive(model, **options) if args.progressive else _exact_only(model, options)
            async for result in results:
                out = _result_fields(result, model)
                if result.precision == "coarse":
                    preview, preview_result = out, result
                    bar.close()
                    if not args.json:
                        _print_result(args, out, label="preview (coarse weights)")
                    continue
                break
            if args.save_logits:
                np.save(args.save_logits, result.prompt_logits.astype(np.float32))
            if preview is not None:
                preview["cosine_to_exact"] = _cosine(preview_result, result)
                out["preview"] = preview
            bar.close()  # the result starts on a line of its own
            if args.progressive and model.progressive and preview is None and not args.json:
                print("no preview: the exact weights were already here", file=sys.stderr)
            _print_result(args, out, label="exact" if preview is not None else "")
            if not args.no_finish and not model.is_complete:
                if not args.quiet and not args.json:
                    left = format_bytes(max(0, model.stats.bytes_total - model.stats.bytes_downloaded))
                    print(f"completing the cache for the next run ({left} left; --no-finish stops here)", file=sys.stderr)
                await model.wait_complete()
            if args.timeline_png:
                from .timeline_png import draw_timeline

                floor = out["bytes_downloaded"] / args.link_rate if args.link_rate else None
                draw_timeline(
                    args.timeline_png,
                    model.layer_spans(),
                    result.timeline,
                    started,
                    rows=result.row_fetches,
                    result_s=result.total_s,
                    preview_s=preview["total_s"] if preview is not None else None,
                    preview=preview_result.timeline if preview is not None else (),
                    link_floor_s=floor,
                    title=f"{Path(args.source.split('#')[0]).name}: result after {format_bytes(result.bytes_needed)} needed"
                    + (f" at {args.link_rate * 8 / 1e6:g} Mbit/s" if args.link_rate else ""),
                )
    finally:
        bar.close()


async def _exact_only(model: Any, options: dict[str, Any]) -> Any:
    from .runtime import run

    yield await run(model, **options)


def _result_fields(result: Any, model: Any) -> dict[str, Any]:
    """A run's result as the JSON fields ``run`` prints."""
    out: dict[str, Any] = {"architecture": result.architecture, "precision": result.precision}
    if result.embedding is not None:
        out["embedding"] = result.embedding[0].tolist() if len(result.embedding) == 1 else result.embedding.tolist()
    else:
        out["generated_ids"] = result.generated_ids
        out["text"] = result.text
        out["first_token_s"] = result.first_token_s
    return out | {
        "timeline": [t.as_dict() for t in result.timeline],
        "rows": [r.as_dict() for r in result.row_fetches],
        "first_layer_done_s": result.first_layer_done_s,
        "total_s": result.total_s,
        "bytes_downloaded": model.stats.bytes_downloaded,  # when the result was there
        "bytes_needed": result.bytes_needed,  # what the result depended on
        "file_bytes": model.stats.bytes_total,
    }


def _cosine(preview: Any, exact: Any) -> float | list[float]:
    """Cosine of the preview to the exact result: per sentence for embeddings, of the first token's logits for a decoder."""
    import numpy as np

    a, b = (preview.embedding, exact.embedding) if exact.embedding is not None else (preview.first_token_logits, exact.first_token_logits)
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    cosines = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(cosines[0]) if len(cosines) == 1 else cosines.tolist()


def _print_result(args: argparse.Namespace, result: dict[str, Any], label: str = "") -> None:
    if args.json:
        print(json.dumps(result), flush=True)
        return
    if "embedding" in result:
        vectors = result["embedding"] if isinstance(result["embedding"][0], list) else [result["embedding"]]
        for vector in vectors:
            print("[" + ", ".join(f"{v:.6f}" for v in vector) + "]")
    else:
        print(result["text"] if result["text"] is not None else ",".join(map(str, result["generated_ids"])))
    sys.stdout.flush()
    first = result["first_layer_done_s"]
    needed = f"{format_bytes(result['bytes_needed'])} of {format_bytes(result['file_bytes'])} needed"
    what = f"{label} result" if label else "result"
    similar = f", cosine to the exact result {_format_cosine(result['preview']['cosine_to_exact'])}" if "preview" in result else ""
    print(
        f"block 0 done at {first:.3f} s, {what} at {result['total_s']:.3f} s ({needed}), "
        f"{format_bytes(result['bytes_downloaded'])} downloaded by then{similar}"
        if first is not None
        else f"{what} at {result['total_s']:.3f} s ({needed}){similar}",
        file=sys.stderr,
    )


def _format_cosine(value: float | list[float]) -> str:
    values = value if isinstance(value, list) else [value]
    return f"{min(values):.4f}" if len(values) == 1 else f"min {min(values):.4f}, mean {sum(values) / len(values):.4f}"


def cmd_run(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.ids is None):
        print("error: give --text TEXT or --ids 1,2,3", file=sys.stderr)
        return EXIT_USAGE
    if args.timeline_png and importlib.util.find_spec("matplotlib") is None:  # say so before the run, not after it
        print("error: --timeline-png needs matplotlib: pip install 'streamload[plot]'", file=sys.stderr)
        return EXIT_USAGE
    if not resolve_source(args, "running"):
        return EXIT_FAILURE
    asyncio.run(_run(args))
    return EXIT_OK


# ---------------------------------------------------------------- list, rm


def cmd_list(args: argparse.Namespace) -> int:
    from .cachedir import list_cached_models
    from .formats.reader import read_header

    rows = []
    for cached in list_cached_models(cache_dir_of(args)):
        architecture, manifest = "?", None
        if cached.header is not None:
            try:
                _, manifest = read_header(cached.header, None)
                architecture = manifest.architecture
            except StreamloadError:
                architecture = "damaged"
        status = "complete" if cached.complete else f"partial {_done_percent(cached.directory, manifest)}%"
        rows.append(
            {
                "digest": cached.digest,
                "architecture": architecture,
                "size_bytes": cached.size_bytes,
                "status": status,
                "sources": list(cached.sources),
                "path": str(cached.directory),
            }
        )
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    if not rows:
        print(f"no models in {cache_dir_of(args)}")
        return EXIT_OK
    print(f"{len(rows)} model{'s' if len(rows) != 1 else ''} in {cache_dir_of(args)}")
    print(f"{'DIGEST':<14} {'ARCH':<8} {'SIZE':>10} {'STATUS':<13} SOURCE")
    for row in rows:
        print(
            f"{row['digest'][:12]:<14} {row['architecture']:<8} {format_bytes(row['size_bytes']):>10} "
            f"{row['status']:<13} {', '.join(row['sources']) or '-'}"
        )
    return EXIT_OK


def _done_percent(directory: Path, manifest: Any) -> int:
    """Percent of the compressed bytes in the cache, the measure the progress bar shows (chunks differ in size)."""
    from .cache import JOURNAL_NAME, JOURNAL_RECORD

    if manifest is None:
        return 0
    try:
        data = (directory / JOURNAL_NAME).read_bytes()
    except OSError:
        return 0
    sizes = {c.index: c.size_bytes for c in manifest.file_order_chunks()}  # a progressive model's refinements too
    done = {index for index, _ in JOURNAL_RECORD.iter_unpack(data[: len(data) - len(data) % JOURNAL_RECORD.size]) if index in sizes}
    return int(100 * sum(sizes[i] for i in done) / max(1, sum(sizes.values())))


def cmd_rm(args: argparse.Namespace) -> int:
    from .cachedir import list_cached_models, remove_cached_model

    root = cache_dir_of(args)
    prefix = args.digest.lower().removeprefix("sha256:")
    matches = [m for m in list_cached_models(root) if m.digest.startswith(prefix)] if len(prefix) >= 4 else []
    if len(matches) != 1:
        print(
            f"error: {'no' if not matches else 'more than one'} cached model matches {args.digest!r} "
            "(give at least 4 hex digits; see `streamload list`)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    remove_cached_model(root, matches[0].digest)
    print(f"deleted {matches[0].digest[:12]} ({format_bytes(matches[0].size_bytes)})")
    return EXIT_OK


# ---------------------------------------------------------------- argument types: a bad value is a one-line error, exit status 2


def _number(kind: Callable[[str], Any], what: str, *, low: float | None = None, high: float | None = None, above: float | None = None):
    """An argparse type: ``kind`` (int or float) within [low, high], or above ``above`` (exclusive)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (
            not math.isfinite(value)
            or (low is not None and value < low)
            or (high is not None and value > high)
            or (above is not None and value <= above)
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_port = _number(int, "a port number in 0..65535 (0: any free port)", low=0, high=65535)
_positive_rate = _number(float, "a rate above 0 bytes per second", above=0)
_milliseconds = _number(float, "a delay of 0 ms or more", low=0)
_connections = _number(int, "a number of connections from 1 to 64", low=1, high=64)
_token_count = _number(int, "a number of tokens, 0 or more", low=0)
_temperature = _number(float, "a temperature of 0 (greedy) or more", low=0)
_top_p = _number(float, "a probability mass in (0, 1]", above=0, high=1)
_seed = _number(int, "a seed of 0 or more", low=0)
_zstd_level = _number(int, "a zstd level from 1 to 22", low=1, high=22)
_chunk_size = _number(int, f"a chunk size from 1 to {MAX_CHUNK_RAW_SIZE_BYTES} bytes", low=1, high=MAX_CHUNK_RAW_SIZE_BYTES)


def _parse_ids(text: str) -> list[int]:
    parts = [part for part in text.replace(" ", "").split(",") if part]
    if not parts or not all(re.fullmatch(r"\d+", part) for part in parts):
        raise argparse.ArgumentTypeError(f"takes comma-separated token ids (integers 0 or more), got {text!r}")
    return [int(part) for part in parts]


def _text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the text is empty: give at least one word")
    return text


def _digest(text: str) -> str:
    digest = text.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 digest (64 hex digits; `streamload inspect` prints it)")
    return digest


def _output_file(text: str) -> str:
    directory = Path(text).parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {directory} does not exist: create it first (mkdir -p {directory})")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give the .slm file to write")
    return text


def _model_file_or_url(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a .slm file in it")
    return text


def _mirror_url(text: str) -> str:
    if not is_url(text):
        raise argparse.ArgumentTypeError(f"a mirror is an http(s) URL of the same .slm file, got {text!r}")
    return text


def _model_file(text: str) -> str:
    if is_url(text):
        raise argparse.ArgumentTypeError(
            f"verify checks a local file; to check {text}, `streamload fetch` it (every chunk is verified) or download it first"
        )
    return _model_file_or_url(text)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the message and where to read more, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    cache_help = f"cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload; here: {default_cache_dir()})"
    parser = _Parser(prog="streamload", description="Stream int8 language models over HTTP and run them while they download.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("convert", help="convert a Hugging Face model folder or .safetensors file to .slm")
    p.add_argument("source", help="model folder (config.json + safetensors) or a .safetensors file")
    p.add_argument("-o", "--output", required=True, type=_output_file, help="the .slm file to write")
    p.add_argument("--quant", choices=("int8", "none"), default="int8", help="int8: 2-D weights to int8 with per-row scales (default)")
    p.add_argument(
        "--level", type=_zstd_level, default=3, help="zstd level for every chunk (default 3; higher levels gain nothing on int8)"
    )
    p.add_argument("--chunk-size", type=_chunk_size, default=1 << 20, help="raw bytes per chunk (default 1 MiB)")
    p.add_argument(
        "--progressive",
        action="store_true",
        help="store int8 matrices as coarse levels first and refinements after, so `run --progressive` can print a preview "
        "before the exact result (calibrated on a bundled text; about 1.3%% larger)",
    )
    p.add_argument("--config", help="config.json to use when the source has none beside it")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--verbose", dest="tensor_table", action="store_true", help="also print every tensor's shape, dtype and error")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("inspect", help="show a model file's layers, sizes, compression and quantization error")
    p.add_argument("source", type=_model_file_or_url, help="a .slm file or its URL (only the manifest is fetched)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--header", action="append", type=_header_option, metavar="'NAME: VALUE'", help=HEADER_HELP)
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("verify", help="check every chunk's sha256; exit status 0 only when the file is intact")
    p.add_argument("file", type=_model_file, help="a local .slm file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("serve", help="serve the .slm files of a directory over HTTP (ranges, ETags, optional link emulation)")
    p.add_argument("directory", help="directory holding .slm files")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=_port, default=8800, help="port to listen on (default 8800; 0 takes a free port and prints it)")
    p.add_argument("--rate", type=_positive_rate, metavar="BYTES_PER_S", help="limit each connection to this many bytes per second")
    p.add_argument("--latency-ms", type=_milliseconds, default=0.0, help="delay every response by this many milliseconds")
    p.add_argument("--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no access log on stderr")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("fetch", help="download a model into the cache, verified, with a progress bar")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)

    p = commands.add_parser("run", help="stream a model and run it: embeddings for encoders, generation for decoders")
    add_source_arguments(p)
    p.add_argument("--text", action="append", type=_text, help="input text (repeat for a batch of sentences with an encoder)")
    p.add_argument("--ids", type=_parse_ids, help="comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=_token_count, help="decoder: tokens to generate (default 16)")
    p.add_argument("--temperature", type=_temperature, help="decoder: 0 is greedy (default)")
    p.add_argument("--top-p", type=_top_p, help="decoder: nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=_seed, help="decoder: sampling seed (default 0)")
    p.add_argument("--save-logits", metavar="FILE.npy", help="decoder: save the prompt's logits, float32 [prompt length, vocab]")
    p.add_argument("--json", action="store_true", help="print one JSON object (result, timeline, timings, bytes)")
    p.add_argument(
        "--no-finish", action="store_true", help="stop once the result is printed (default: complete the cache for the next run)"
    )
    p.add_argument(
        "--progressive",
        action="store_true",
        help="a model converted with --progressive: print a preview from the coarse weights first, then the exact result",
    )
    p.add_argument("--timeline-png", metavar="FILE.png", help="draw download, decompress and compute per layer (needs matplotlib)")
    p.add_argument(
        "--link-rate", type=_positive_rate, metavar="BYTES_PER_S", help="mark the link floor (bytes downloaded / rate) on the picture"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("list", help="list the models in the cache")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--json", action="store_true", help="print a JSON array: digest, architecture, size, status, sources, path")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("rm", help="delete a model from the cache")
    p.add_argument("digest", help="the model's digest or a unique prefix of it (see `streamload list`)")
    p.add_argument("--cache-dir", help=cache_help)
    p.set_defaults(func=cmd_rm)
    return parser


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        help="http(s) URL of a .slm file (optionally #sha256=DIGEST), a local path, "
        "or a cached model's file name or digest prefix as `streamload list` shows them",
    )
    p.add_argument("--cache-dir", help=f"cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload; here: {default_cache_dir()})")
    p.add_argument("--digest", type=_digest, help="refuse a model whose manifest sha256 differs")
    p.add_argument("--connections", type=_connections, default=1, help="parallel ranged requests (default 1: strict layer order)")
    p.add_argument("--header", action="append", type=_header_option, metavar="'NAME: VALUE'", help=HEADER_HELP)
    p.add_argument(
        "--mirror",
        action="append",
        type=_mirror_url,
        metavar="URL",
        help="another URL of the same .slm file (repeat for more): the download is spread over all that serve the same "
        "manifest digest, by their measured rates (--connections requests each, at least 2); one serving another model is refused",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)], format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except UsageError as exc:  # an option that does not fit the model: a usage error, as argparse reports them
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StreamloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        print(f"error: {exc.filename or exc}: no such file", file=sys.stderr)
        return EXIT_FAILURE
    except IsADirectoryError as exc:
        print(f"error: {exc.filename or exc}: is a directory, not a .slm file", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
