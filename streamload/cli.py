"""The ``streamload`` command line: the only place that prints or exits (the library only logs)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cache import default_cache_dir
from .errors import RuntimeModelError, StreamloadError
from .formats import ModelReader, summarize_manifest

EXIT_OK = 0
EXIT_FAILURE = 1  # the operation failed (bad file, network, integrity)
EXIT_USAGE = 2  # argparse's own code for bad arguments


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---------------------------------------------------------------- convert


def cmd_convert(args: argparse.Namespace) -> int:
    from .formats import convert  # the writing side, imported only to convert

    report = convert(
        args.source, args.output, quant=args.quant, zstd_level=args.level, chunk_size_bytes=args.chunk_size, config_path=args.config
    )
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
    print(f"{'tensor':<56} {'layer':>5} {'shape':>14} {'dtype':>7} {'max abs err':>12} {'max rel err':>12}")
    for t in report.tensors:
        errors = f"{t.max_abs_error:12.3e} {t.max_rel_error:12.3e}" if t.max_abs_error is not None else f"{'-':>12} {'-':>12}"
        print(f"{t.name:<56} {t.layer_index:>5} {'x'.join(map(str, t.shape)):>14} {t.stored_dtype:>7} {errors}")
    ratio = report.output_size_bytes / report.source_size_bytes
    print(
        f"\nwrote {report.path}: {format_bytes(report.output_size_bytes)} from {format_bytes(report.source_size_bytes)} "
        f"({ratio:.3f}x) in {report.seconds:.2f} s; largest error abs {report.max_abs_error:.3e}, rel {report.max_rel_error:.3e}"
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
    payload = summary["int8_payload"]
    if payload:
        print(
            f"  int8 payload   {format_bytes(payload['compressed_bytes'])} compressed; "
            f"order-0 entropy {payload['entropy_bits_per_weight']:.3f} bits/weight, "
            f"bound {format_bytes(payload['entropy_bound_bytes'])}: {100 * payload['above_bound']:+.2f}% vs bound"
        )


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.source.startswith(("http://", "https://")):
        from .model import read_remote_header

        manifest, size = asyncio.run(read_remote_header(args.source))
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
    from .server import ServerConfig, run_server

    if not Path(args.directory).is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return EXIT_FAILURE
    logging.getLogger("streamload.server.access").setLevel(logging.INFO)
    config = ServerConfig(
        directory=Path(args.directory),
        rate_bytes_per_s=args.rate,
        latency_ms=args.latency_ms,
        ranges_enabled=not args.no_ranges,
    )
    run_server(config, host=args.host, port=args.port, announce=lambda line: print(line, flush=True))
    return EXIT_OK


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
                total=progress.bytes_to_download,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=self.label,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.n = min(progress.bytes_downloaded, self.bar.total or progress.bytes_downloaded)
        self.bar.set_postfix_str(f"layers {progress.layers_ready}/{progress.layers_total}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cache_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:
    from . import model as streamload_model

    bar = ProgressBar(f"pulling {Path(args.source.split('#')[0]).name}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with streamload_model.open(
            args.source, cache_dir=cache_dir_of(args), digest=args.digest, connections=args.connections, progress=bar
        ) as model:
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
            }
    finally:
        bar.close()


def cmd_fetch(args: argparse.Namespace) -> int:
    result = asyncio.run(_fetch(args))
    if args.json:
        print(json.dumps(result))
    else:
        rate = result["bytes_downloaded"] / result["seconds"] if result["seconds"] > 0 else 0.0
        print(
            f"{result['architecture']} model sha256:{result['manifest_digest'][:12]} ready in {result['path']}\n"
            f"downloaded {format_bytes(result['bytes_downloaded'])} of {format_bytes(result['bytes_total'])} "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) "
            f"in {result['seconds']:.2f} s ({format_bytes(rate)}/s)"
        )
    return EXIT_OK


# ---------------------------------------------------------------- run


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ids takes comma-separated integers, got {text!r}") from None


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import time

    import numpy as np

    from . import model as streamload_model
    from .runtime import run

    started = time.perf_counter()
    bar = ProgressBar(f"streaming {Path(args.source.split('#')[0]).name}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with streamload_model.open(
            args.source, cache_dir=cache_dir_of(args), digest=args.digest, connections=args.connections, progress=bar
        ) as model:
            if args.save_logits and model.manifest.architecture != "llama":
                raise RuntimeModelError(f"--save-logits needs a decoder; this model is a {model.manifest.architecture} encoder")
            result = await run(
                model,
                texts=args.text,
                ids=args.ids,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                keep_prompt_logits=bool(args.save_logits),
                started=started,
            )
            bytes_downloaded = model.stats.bytes_downloaded
            if args.timeline_png:
                from .timeline_png import draw_timeline

                floor = bytes_downloaded / args.link_rate if args.link_rate else None
                draw_timeline(
                    args.timeline_png,
                    model.layer_spans(),
                    result.timeline,
                    started,
                    link_floor_s=floor,
                    title=f"{Path(args.source.split('#')[0]).name}: {format_bytes(bytes_downloaded)}"
                    + (f" at {args.link_rate * 8 / 1e6:g} Mbit/s" if args.link_rate else ""),
                )
    finally:
        bar.close()
    if args.save_logits:
        np.save(args.save_logits, result.prompt_logits.astype(np.float32))
    out: dict[str, Any] = {"architecture": result.architecture}
    if result.embedding is not None:
        out["embedding"] = result.embedding[0].tolist() if len(result.embedding) == 1 else result.embedding.tolist()
    else:
        out["generated_ids"] = result.generated_ids
        out["text"] = result.text
    out |= {
        "timeline": [t.as_dict() for t in result.timeline],
        "first_layer_done_s": result.first_layer_done_s,
        "total_s": result.total_s,
        "bytes_downloaded": bytes_downloaded,
    }
    return out


def cmd_run(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.ids is None):
        print("error: give --text TEXT or --ids 1,2,3", file=sys.stderr)
        return EXIT_USAGE
    result = asyncio.run(_run(args))
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    if "embedding" in result:
        vectors = result["embedding"] if isinstance(result["embedding"][0], list) else [result["embedding"]]
        for vector in vectors:
            print("[" + ", ".join(f"{v:.6f}" for v in vector) + "]")
    else:
        print(result["text"] if result["text"] is not None else ",".join(map(str, result["generated_ids"])))
    first = result["first_layer_done_s"]
    print(
        f"block 0 done at {first:.3f} s, result at {result['total_s']:.3f} s, {format_bytes(result['bytes_downloaded'])} downloaded"
        if first is not None
        else f"result at {result['total_s']:.3f} s",
        file=sys.stderr,
    )
    return EXIT_OK


# ---------------------------------------------------------------- list, rm


def cmd_list(args: argparse.Namespace) -> int:
    from .cachedir import list_cached_models
    from .formats.reader import read_header

    rows = []
    for cached in list_cached_models(cache_dir_of(args)):
        architecture, chunks = "?", 0
        if cached.header is not None:
            try:
                _, manifest = read_header(cached.header, None)
                architecture, chunks = manifest.architecture, len(manifest.chunks)
            except StreamloadError:
                architecture = "damaged"
        status = "complete" if cached.complete else f"partial {100 * cached.chunks_done // max(1, chunks)}%"
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
    print(f"{'DIGEST':<14} {'ARCH':<8} {'SIZE':>10} {'STATUS':<13} SOURCE")
    for row in rows:
        print(
            f"{row['digest'][:12]:<14} {row['architecture']:<8} {format_bytes(row['size_bytes']):>10} "
            f"{row['status']:<13} {', '.join(row['sources']) or '-'}"
        )
    return EXIT_OK


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


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamload", description="Stream int8 language models over HTTP and run them while they download."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("convert", help="convert a Hugging Face model folder or .safetensors file to .slm")
    p.add_argument("source", help="model folder (config.json + safetensors) or a .safetensors file")
    p.add_argument("-o", "--output", required=True, help="the .slm file to write")
    p.add_argument("--quant", choices=("int8", "none"), default="int8", help="int8: 2-D weights to int8 with per-row scales (default)")
    p.add_argument("--level", type=int, default=3, help="zstd level for every chunk (default 3; higher levels gain nothing on int8)")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="raw bytes per chunk (default 1 MiB)")
    p.add_argument("--config", help="config.json to use when the source has none beside it")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("inspect", help="show a model file's layers, sizes, compression and quantization error")
    p.add_argument("source", help="a .slm file or its URL (only the manifest is fetched)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("verify", help="check every chunk's sha256; exit status 0 only when the file is intact")
    p.add_argument("file", help="a .slm file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_verify)

    p = commands.add_parser("serve", help="serve the .slm files of a directory over HTTP (ranges, ETags, optional link emulation)")
    p.add_argument("directory", help="directory holding .slm files")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8800)
    p.add_argument("--rate", type=float, metavar="BYTES_PER_S", help="limit each connection to this many bytes per second")
    p.add_argument("--latency-ms", type=float, default=0.0, help="delay every response by this many milliseconds")
    p.add_argument("--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("fetch", help="download a model into the cache, verified, with a progress bar")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)

    p = commands.add_parser("run", help="stream a model and run it: embeddings for encoders, generation for decoders")
    add_source_arguments(p)
    p.add_argument("--text", action="append", help="input text (repeat for a batch of sentences with an encoder)")
    p.add_argument("--ids", type=_parse_ids, help="comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=int, default=16, help="decoder: tokens to generate (default 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="decoder: 0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="decoder: nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="decoder: sampling seed")
    p.add_argument("--save-logits", metavar="FILE.npy", help="decoder: save the prompt's logits, float32 [prompt length, vocab]")
    p.add_argument("--json", action="store_true", help="print one JSON object (result, timeline, timings, bytes)")
    p.add_argument("--timeline-png", metavar="FILE.png", help="draw download, decompress and compute per layer (needs matplotlib)")
    p.add_argument("--link-rate", type=float, metavar="BYTES_PER_S", help="mark the link floor (bytes downloaded / rate) on the picture")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("list", help="list the models in the cache")
    p.add_argument("--cache-dir", help="cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("rm", help="delete a model from the cache")
    p.add_argument("digest", help="the model's digest or a unique prefix of it (see `streamload list`)")
    p.add_argument("--cache-dir", help="cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload)")
    p.set_defaults(func=cmd_rm)
    return parser


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="http(s) URL of a .slm file (optionally #sha256=DIGEST) or a local path")
    p.add_argument("--cache-dir", help="cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload)")
    p.add_argument("--digest", help="refuse a model whose manifest sha256 differs")
    p.add_argument("--connections", type=int, default=1, help="parallel ranged requests (default 1: strict layer order)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)], format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except StreamloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        print(f"error: {exc.filename or exc}: no such file", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
