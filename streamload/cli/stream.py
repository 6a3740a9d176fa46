"""The commands that stream a model: ``fetch`` (into the cache) and ``run`` (a preview, then the exact result)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from typing import Any

from ..errors import UsageError, redact_urls
from .cached import file_name, is_url, open_model, resolve_source
from .output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ProgressBar, format_bytes, print_result


async def _fetch(args: argparse.Namespace) -> dict[str, Any]:

    bar = ProgressBar(f"pulling {file_name(args.source)}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
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
                "bytes_by_source": {redact_urls(url): count for url, count in stats.bytes_by_source.items()},
            }
    finally:
        bar.close()


def cmd_fetch(args: argparse.Namespace) -> int:
    if not resolve_source(args, "fetching"):
        return EXIT_FAILURE
    result = asyncio.run(_fetch(args))
    if args.json:
        print(json.dumps(result))
        return EXIT_OK
    print(f"{result['architecture']} model sha256:{result['manifest_digest'][:12]} ready in {result['path']}")
    if result["chunks_cached"] == result["chunks_total"]:
        print(f"already cached whole: nothing {'downloaded' if is_url(args.source) else 'copied'} ({result['chunks_total']} chunks)")
    elif not is_url(args.source):
        print(
            f"copied from the local file {args.source}, every chunk verified "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) in {result['seconds']:.2f} s"
        )
    else:
        rate = result["bytes_downloaded"] / result["seconds"] if result["seconds"] > 0 else 0.0
        print(
            f"downloaded {format_bytes(result['bytes_downloaded'])} of {format_bytes(result['bytes_total'])} "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) "
            f"in {result['seconds']:.2f} s ({format_bytes(rate)}/s)"
        )
        if len(args.mirror or ()) > 0:  # each source's share; a refused or dead mirror sent nothing
            for url in dict.fromkeys(u.split("#")[0] for u in [args.source, *args.mirror]):
                print(f"  {format_bytes(result['bytes_by_source'].get(redact_urls(url), 0)):>10} from {redact_urls(url)}")
    return EXIT_OK


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
    if architecture == "llama" and args.text is not None and len(args.text) > 1:
        if not args.words:
            raise UsageError("a decoder takes one prompt: give one --text, or the prompt's words as arguments")
        args.text = [" ".join(args.text)]  # `streamload run llama why is the sky blue`, as ollama run reads it
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

    from ..runtime import run_progressive

    started = time.perf_counter()
    bar = ProgressBar(f"streaming {file_name(args.source)}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with open_model(args, bar) as model:
            check_run_options(args, model.config)
            if args.progressive and not model.progressive:
                shown = redact_urls(args.source)
                print(f"warning: {shown} was not converted with --progressive: no preview, only the exact result", file=sys.stderr)
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
                        print_result(args, out, label="preview (coarse weights)")
                    continue
                break
            if args.save_logits:
                np.save(args.save_logits, result.prompt_logits.astype(np.float32))
            if preview is not None:
                preview["cosine_to_exact"] = _cosine(preview_result, result)
                out["preview"] = preview
            bar.close()  # the result starts on a line of its own
            if args.progressive and model.progressive and preview is None:  # on stderr, so with --json too
                print("no preview: the exact weights were already here", file=sys.stderr)
            print_result(args, out, label="exact" if preview is not None else "")
            if not args.no_finish and not model.is_complete:
                if not args.quiet and not args.json:
                    print(f"completing the cache for the next run ({_left(bar, model)} left; --no-finish stops here)", file=sys.stderr)
                stats = await model.wait_complete()
                if not args.quiet and not args.json:
                    done = f"cache complete in {model.path} ({format_bytes(stats.bytes_total)})"
                    after = "needs no network" if is_url(args.source) else "maps it without decompressing"
                    print(f"{done}: the next run {after}", file=sys.stderr)
            if args.timeline_png:
                from ..timeline_png import draw_timeline

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
                    title=f"{file_name(args.source)}: result after {format_bytes(result.bytes_needed)} needed"
                    + (f" at {args.link_rate * 8 / 1e6:g} Mbit/s" if args.link_rate else ""),
                )
    finally:
        bar.close()


def _left(bar: ProgressBar, model: Any) -> str:
    """What the cache still lacks: the file less what it held at the start (a report's) and what came since (now: the
    reports are spaced out, and on a fast link the last one is well behind)."""
    cached = bar.last.bytes_cached if bar.last is not None else 0
    return format_bytes(max(0, model.stats.bytes_total - cached - model.stats.bytes_downloaded))


async def _exact_only(model: Any, options: dict[str, Any]) -> Any:
    from ..runtime import run

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


def cmd_run(args: argparse.Namespace) -> int:
    if args.texts and args.text:
        print("error: give the texts as arguments or with --text, not both", file=sys.stderr)
        return EXIT_USAGE
    args.words = bool(args.texts)  # a decoder's prompt may come as words: they are joined
    args.text = args.texts or args.text
    if (args.text is None) == (args.ids is None):
        what = "give the text (streamload run MODEL 'TEXT', or --text TEXT) or --ids 1,2,3"
        print(f"error: {what}, not both" if args.text else f"error: {what}", file=sys.stderr)
        return EXIT_USAGE
    if args.timeline_png and importlib.util.find_spec("matplotlib") is None:  # say so before the run, not after it
        print("error: --timeline-png needs matplotlib: pip install -e '.[plot]' (from a source checkout)", file=sys.stderr)
        return EXIT_USAGE
    if not resolve_source(args, "running"):
        return EXIT_FAILURE
    asyncio.run(_run(args))
    return EXIT_OK
