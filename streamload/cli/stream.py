"""The commands that stream a model: ``fetch`` (into the cache) and ``run`` (a preview, then the exact result)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
from typing import Any

from ..errors import UsageError, redact_urls
from .cached import file_name, is_url, open_model, resolve_source
from .output import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ProgressBar, TokenPrinter, format_bytes, print_result
from .updates import describe_update, update_fields


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
            } | update_fields(stats)
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
        # more than the file when some bytes came twice (the mirrors' header probes, spans retried or raced)
        of = "for a file of" if result["bytes_downloaded"] > result["bytes_total"] else "of"
        print(
            f"downloaded {format_bytes(result['bytes_downloaded'])} {of} {format_bytes(result['bytes_total'])} "
            f"({result['chunks_cached']} of {result['chunks_total']} chunks were cached) "
            f"in {result['seconds']:.2f} s ({format_bytes(rate)}/s)"
        )
        if result["chunks_local"] or result["chunks_delta"]:
            print(describe_update(result))
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
    decoder = architecture != "bert"  # every other family the runtime runs generates text
    if not decoder:
        given = [f"--{name.replace('_', '-')}" for name in (*DECODER_DEFAULTS, "save_logits") if getattr(args, name) is not None]
        if given:
            raise UsageError(
                f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} a decoder; this model is a {architecture} encoder"
            )
    for name, default in DECODER_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if getattr(args, "from_stdin", False) and not decoder and args.text is not None:
        args.text = [line for line in args.text[0].splitlines() if line.strip()]  # an encoder: one text a line
    if decoder and args.text is not None and len(args.text) > 1:
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

    started = time.perf_counter()
    bar = ProgressBar(f"streaming {file_name(args.source)}", enabled=not args.json and not args.quiet and sys.stderr.isatty())
    try:
        async with open_model(args, bar) as model:
            check_run_options(args, model.config)
            if args.text is None and args.ids is None:
                await _interactive(args, model, bar)
                return
            if args.progressive and not model.progressive:
                shown = redact_urls(args.source)
                print(f"warning: {shown} was not converted with --progressive: no preview, only the exact result", file=sys.stderr)
            printer = TokenPrinter(model, bar) if model.manifest.architecture != "bert" and not args.json else None
            result, out, preview_result = await _compute(args, model, bar, printer, started)
            _print_exact(args, model, bar, printer, out)
            await _complete_cache(args, model, bar)
            if args.timeline_png:
                _draw_timeline(args, model, started, result, out, preview_result)
    finally:
        bar.close()


async def _compute(
    args: argparse.Namespace, model: Any, bar: ProgressBar, printer: TokenPrinter | None, started: float
) -> tuple[Any, dict[str, Any], Any]:
    """The exact result, a preview from coarse weights printed on the way (--progressive), the logits saved
    (--save-logits): returns the exact result, its fields (the preview's under "preview") and the preview's result or None."""
    import numpy as np

    from ..runtime import run_progressive

    options = {
        "texts": args.text,
        "ids": args.ids,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "keep_prompt_logits": bool(args.save_logits),
        "started": started,
        "memory_budget_bytes": memory_budget_setting(args.memory_budget),
    }
    if printer is not None:
        options["on_token"] = printer
    preview: dict[str, Any] | None = None
    preview_result = None
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
    return result, out, preview_result


def _print_exact(args: argparse.Namespace, model: Any, bar: ProgressBar, printer: TokenPrinter | None, out: dict[str, Any]) -> None:
    """The exact result (a decoder's text already streamed by ``printer``), then what an update reused, on stderr."""
    bar.close()  # the result starts on a line of its own
    if args.progressive and model.progressive and "preview" not in out:  # on stderr, so with --json too
        print("no preview: the exact weights were already here", file=sys.stderr)
    if printer is not None:
        printer.finish()
    print_result(args, out, label="exact" if "preview" in out else "", streamed=printer is not None)
    if (out["chunks_local"] or out["chunks_delta"]) and not args.json and not args.quiet:
        print(describe_update(out), file=sys.stderr)


async def _complete_cache(args: argparse.Namespace, model: Any, bar: ProgressBar) -> None:
    """Unless --no-finish, wait for the download to complete the cache; a cache read without a connection stays partial."""
    if args.no_finish or model.is_complete:
        return
    offline = model.offline_reason
    if offline is not None:  # the result came from a partial cache
        print(f"warning: the cache stays partial: {offline}; a run with a connection completes it", file=sys.stderr)
        return
    if not args.quiet and not args.json:
        print(f"completing the cache for the next run ({_left(bar, model)} left; --no-finish stops here)", file=sys.stderr)
    stats = await model.wait_complete()
    if not args.quiet and not args.json:
        done = f"cache complete in {model.path} ({format_bytes(stats.bytes_total)})"
        after = "needs no network" if is_url(args.source) else "maps it without decompressing"
        print(f"{done}: the next run {after}", file=sys.stderr)


def _draw_timeline(args: argparse.Namespace, model: Any, started: float, result: Any, out: dict[str, Any], preview_result: Any) -> None:
    """--timeline-png: per layer, download, decompress and compute; the link floor of --link-rate marked."""
    from ..timeline_png import draw_timeline

    floor = out["bytes_downloaded"] / args.link_rate if args.link_rate else None
    draw_timeline(
        args.timeline_png,
        model.layer_times(),
        result.timeline,
        started,
        rows=result.row_fetches,
        result_s=result.total_s,
        preview_s=out["preview"]["total_s"] if preview_result is not None else None,
        preview=preview_result.timeline if preview_result is not None else (),
        link_floor_s=floor,
        title=f"{file_name(args.source)}: result after {format_bytes(result.bytes_needed)} needed"
        + (f" at {args.link_rate * 8 / 1e6:g} Mbit/s" if args.link_rate else ""),
    )


async def _interactive(args: argparse.Namespace, model: Any, bar: ProgressBar) -> None:
    """A prompt loop on the loaded model: each line of stdin a prompt (a decoder's reply streamed token by token, an
    encoder's embedding); ``/bye`` or end of input ends it. A decoder whose config has a chat template gets the
    conversation so far rendered through it (needs jinja2); without one each prompt is continued on its own."""
    from ..api import apply_chat_template, chat_template_of
    from ..errors import StreamloadError
    from ..runtime import run

    decoder = model.manifest.architecture != "bert"
    template = chat_template_of(model.config) if decoder else None
    if template is not None and importlib.util.find_spec("jinja2") is None:
        print("warning: this model's chat template needs jinja2 (pip install jinja2): prompts go to the model as typed", file=sys.stderr)
        template = None
    bar.close()  # a bar redrawn under the prompt would garble it; the download goes on behind the session
    tty = sys.stdin.isatty()
    if tty and not args.json:
        what = "chat (the model's template)" if template else ("prompt" if decoder else "text to embed")
        print(f"{what}: one per line; /bye or Ctrl-D to end", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        line = await asyncio.to_thread(_read_line, ">>> " if tty and not args.json else "")
        if line is None or line.strip() == "/bye":
            return
        if not line.strip():
            continue
        options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
        options["seed"] = args.seed
        messages = [*history, {"role": "user", "content": line}]
        if template is not None:
            options["ids"] = model.tokenizer.encode(apply_chat_template(model.config, messages), add_special_tokens=False).ids
            positions = model.config.get("max_position_embeddings")
            if history and isinstance(positions, int) and len(options["ids"]) + args.max_new_tokens > positions:
                print(f"(the conversation outgrew the model's {positions} positions: it starts over from this prompt)", file=sys.stderr)
                history, messages = [], [{"role": "user", "content": line}]
                options["ids"] = model.tokenizer.encode(apply_chat_template(model.config, messages), add_special_tokens=False).ids
        else:
            options["texts"] = [line]
        printer = TokenPrinter(model, bar) if decoder and not args.json else None
        try:
            result = await run(model, on_token=printer, **options)
        except StreamloadError as exc:
            if printer is not None and printer.text:
                printer.finish()
            print(f"error: {exc}" + ("; the conversation starts over" if history else ""), file=sys.stderr)
            history = []
            continue
        bar.close()
        if printer is not None:
            printer.finish()
        print_result(args, _result_fields(result, model), streamed=printer is not None, timings=False)
        if template is not None:
            history = [*messages, {"role": "assistant", "content": result.text or ""}]


def _read_line(prompt: str) -> str | None:
    """One line of stdin (``input``, with line editing on a terminal); None at end of input."""
    try:
        return input(prompt) if prompt else _stdin_line()
    except EOFError:
        if prompt:
            print(file=sys.stderr)
        return None


def _stdin_line() -> str | None:
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def _left(bar: ProgressBar, model: Any) -> str:
    """What the cache still lacks: the file less what it held at the start (a report's) and what came since (now: the
    reports are spaced out, and on a fast link the last one is well behind)."""
    cached = bar.last.bytes_cached if bar.last is not None else 0
    return format_bytes(max(0, model.stats.bytes_total - cached - model.stats.bytes_downloaded))


def memory_budget_setting(given: int | str | None) -> Any:
    """--memory-budget, else $STREAMLOAD_MEMORY_BUDGET (read here, at the CLI's boundary), else the cgroup's limit: a
    ``MemoryBudget`` naming where it came from, or None (no limit)."""
    from ..runtime.memory import MemoryBudget, resolve_memory_budget

    if isinstance(given, int):
        return MemoryBudget(given, "--memory-budget")
    return None if given is None else resolve_memory_budget(None, os.environ)


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
        out["token_times_s"] = result.token_times_s
    return out | {
        "timeline": [t.as_dict() for t in result.timeline],
        "rows": [r.as_dict() for r in result.row_fetches],
        "first_block_done_s": result.first_block_done_s,
        "first_layer_done_s": result.first_block_done_s,  # the old name of first_block_done_s, kept for one release (docs/cli.md)
        "total_s": result.total_s,
        **update_fields(model.stats),  # when the result was there, as bytes_downloaded
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
    args.from_stdin = args.texts == ["-"]  # `streamload run MODEL -`: the prompt is stdin (an encoder's texts: its lines)
    if args.from_stdin:
        text = sys.stdin.read().strip("\n")
        if not text.strip():
            print("error: run MODEL -: stdin held no text", file=sys.stderr)
            return EXIT_USAGE
        args.texts = [text]
    args.words = bool(args.texts) and not args.from_stdin  # a decoder's prompt may come as words: they are joined
    args.text = args.texts or args.text
    if args.text is not None and args.ids is not None:
        print("error: give the text (streamload run MODEL 'TEXT', or --text TEXT) or --ids 1,2,3, not both", file=sys.stderr)
        return EXIT_USAGE  # neither: an interactive session
    if args.timeline_png and importlib.util.find_spec("matplotlib") is None:  # say so before the run, not after it
        print("error: --timeline-png needs matplotlib: pip install -e '.[plot]' (from a source checkout)", file=sys.stderr)
        return EXIT_USAGE
    if not resolve_source(args, "running"):
        return EXIT_FAILURE
    asyncio.run(_run(args))
    return EXIT_OK
