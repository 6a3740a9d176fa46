"""The ``streamload`` command line: the only place that prints or exits (the library only logs).

``parser`` declares the commands and options (``argtypes`` their types); ``files`` (convert, inspect, verify, serve),
``stream`` (fetch, run) and ``cached`` (where a model comes from; list, rm) carry them out; ``output`` is what they show.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import (
    BadMagicError,
    CacheWriteError,
    DigestMismatchError,
    NoConfigError,
    NoTokenizerError,
    StreamloadError,
    UsageError,
    redact_urls,
)
from .argtypes import check_text
from .output import EXIT_FAILURE, EXIT_USAGE
from .parser import build_parser

__all__ = ["entry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "texts", None) is not None:  # `run MODEL -q 'TEXT'`: texts after an option come back
        args.texts += _more_texts(args.command_parser, extra)  # unparsed from argparse, in order
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    verbose = min(args.verbose, 2)  # -v: which module says what, as a developer reads it; by default a user's "warning: ..."
    handler = logging.StreamHandler()
    handler.setFormatter(_UserFormatter("%(levelname)s %(name)s: %(message)s" if verbose else None))
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[verbose], handlers=[handler])
    try:
        return args.func(args)
    except UsageError as exc:  # an option that does not fit the model: a usage error, as argparse reports them
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StreamloadError as exc:
        index = _served_models(args, exc)
        print(f"error: {index or f'{exc}{command_hint(exc)}'}", file=sys.stderr)
        return EXIT_FAILURE
    except FileNotFoundError as exc:
        print(f"error: {exc.filename or exc}: no such file", file=sys.stderr)
        return EXIT_FAILURE
    except IsADirectoryError as exc:
        print(f"error: {exc.filename or exc}: is a directory, not a .slm file", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        resumes = getattr(args, "command", None) in ("fetch", "run")
        print(
            "interrupted" + ("; what was verified is kept in the cache: the same command resumes from there" if resumes else ""),
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # `streamload inspect m.slm | head`: the reader left; no traceback (Python's documented recipe)
        _discard(sys.stdout)
        return EXIT_FAILURE


def _served_models(args: argparse.Namespace, exc: StreamloadError) -> str | None:
    """When a URL that is not a model answers with a streamload server's JSON index (``GET /``), the models it offers."""
    import json
    import urllib.parse
    import urllib.request

    source = getattr(args, "source", None)
    if not isinstance(exc, BadMagicError) or not isinstance(source, str) or not source.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(source.split("#")[0], timeout=5) as response:  # noqa: S310 - an http(s) URL, checked above
            index = json.loads(response.read(1 << 20))
        names = [m["name"] for m in index["models"] if isinstance(m.get("name"), str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    base = source.split("#")[0].rstrip("/") + "/"
    offered = ", ".join(urllib.parse.urljoin(base, urllib.parse.quote(name)) for name in names) or "no models"
    return f"{source} is a streamload server's index, not a model; it serves: {offered}"


def command_hint(exc: StreamloadError) -> str:
    """The option or command that does what the library's message asks (the library names none of the CLI's)."""
    if isinstance(exc, CacheWriteError):
        return " (--cache-dir DIR)"
    if isinstance(exc, NoTokenizerError):
        return " (--ids 1,2,3)"
    if isinstance(exc, NoConfigError):
        return " (--config PATH)"
    if isinstance(exc, DigestMismatchError) and exc.cached_digest is not None:
        return f" (`streamload rm {exc.cached_digest[:12]}`)"
    if isinstance(exc, BadMagicError):
        return " (`streamload convert` makes .slm files)"
    return ""


def _discard(stream: Any) -> None:
    """Point a stream whose reader left at /dev/null, so what is still buffered goes nowhere instead of raising."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class _UserFormatter(logging.Formatter):
    """``warning: message``, as the CLI's own errors read (``error: ...``); with a format (-v), that format. A URL's
    password and query string (a signed URL's token) are redacted in either."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return redact_urls(text if self._fmt != "%(message)s" else f"{record.levelname.lower()}: {text}")


def _more_texts(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """``run``'s texts that argparse left over: every word before a ``--`` that is not an option, and all after it."""
    end = words.index("--") if "--" in words else len(words)
    options = [word for word in words[:end] if word.startswith("-") and word != "-"]  # "-": the prompt is stdin
    if options:
        parser.error(f"unrecognized arguments: {' '.join(options)} (a text that starts with '-': after --, or --text=TEXT)")
    texts = words[:end] + words[end + 1 :]
    try:
        return [check_text(text) for text in texts]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"argument TEXT: {exc}")


def entry() -> None:
    """The console script: ``main()``, then exit without Python's teardown.

    Everything a command writes is written and closed when ``main`` returns (the cache through unbuffered descriptors,
    the rest in ``with`` blocks), so what remains is freeing modules, numpy's and OpenBLAS's state, a noticeable part of
    a 0.2 s cached ``streamload run`` (tools/bench_cold_start.py times whole processes). stdout and stderr are flushed,
    logging is shut down, and ``os._exit`` ends the process with ``main``'s status.
    """
    code = main()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`streamload list >&-`)
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # the reader left before the last bytes: as main's own handler, no traceback
            _discard(stream)
            code = code or EXIT_FAILURE
        except (OSError, ValueError):  # a full disk, a stream closed by the command: Python's exit would say the same
            code = code or EXIT_FAILURE
    logging.shutdown()
    os._exit(code)
