"""The ``streamload`` command line: the only place that prints or exits (the library only logs).

``parser`` declares the commands and options; ``files`` (convert, inspect, verify, serve), ``stream`` (fetch, run) and
``cached`` (where a model comes from; list, rm) carry them out; ``output`` is what they show.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from ..errors import StreamloadError, UsageError
from .output import EXIT_FAILURE, EXIT_USAGE
from .parser import build_parser

__all__ = ["entry", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    options = [word for word in extra if word.startswith("-")]
    if extra and getattr(args, "texts", None) is not None and not options:
        args.texts += extra  # `run MODEL -q 'TEXT'`: argparse gives the texts after an option back unparsed
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
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
    except BrokenPipeError:  # `streamload inspect m.slm | head`: the reader left; no traceback (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def entry() -> None:
    """The console script: ``main()``, then exit without Python's teardown.

    Everything a command writes is written and closed when ``main`` returns (the cache through unbuffered descriptors,
    the rest in ``with`` blocks), so what remains is freeing modules, numpy's and OpenBLAS's state, a noticeable part of
    a 0.2 s cached ``streamload run`` (tools/bench_cold_start.py times whole processes). stdout and stderr are flushed,
    logging is shut down, and ``os._exit`` ends the process with ``main``'s status.
    """
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left before the last bytes: as main's own handler, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or EXIT_FAILURE
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
