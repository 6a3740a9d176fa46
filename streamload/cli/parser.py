"""The ``streamload`` argument parser: its commands and options (their types in ``argtypes``), and errors as one line
(exit status 2)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..cache.files import default_cache_dir
from . import argtypes
from .cached import LIMIT_RATE_ENV, RETRIES_ENV, TIMEOUT_ENV, TOKEN_ENV, cmd_list, cmd_rm
from .output import EXIT_USAGE
from .stream import cmd_fetch, cmd_run

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
        from .. import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the message and where to read more, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        """``--option=--`` gives the option the value '--', checked by its type like any other. Python 3.11's argparse
        drops that '--' as if it ended the options, and leaves the option an empty list (``--memory-budget=--`` ran
        as if no budget was given, ``--seed=--`` failed in the runtime: "seed must be an integer 0 or more; got []")."""
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """A command carried out by ``module`` of this package, imported when the command runs (the file commands' modules
    are not on the path of a ``run``, whose cold start skips them)."""

    def carry_out(args: argparse.Namespace) -> int:
        command: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(f".{module}", __package__), name)
        return command(args)

    return carry_out


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the program's own options, then each command with its options, in ``--help`` order."""
    parser = _Parser(prog="streamload", description="Stream int8 language models over HTTP and run them while they download.")
    parser.add_argument("--version", action=_VersionAction)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert_command(commands)
    _add_inspect_command(commands)
    _add_verify_command(commands)
    _add_serve_command(commands)
    _add_fetch_command(commands)
    _add_run_command(commands)
    _add_list_command(commands)
    _add_rm_command(commands)
    return parser


def _cache_dir_help() -> str:
    """What --cache-dir says, the directory it stands for in this environment included."""
    return f"cache directory (default $STREAMLOAD_CACHE or ~/.cache/streamload; here: {default_cache_dir()})"


def _add_header_option(p: argparse.ArgumentParser) -> None:
    """--header, for the commands that may reach a URL."""
    p.add_argument("--header", action="append", type=argtypes.header_option, metavar="'NAME: VALUE'", help=HEADER_HELP)


def _add_file_to_write_option(p: argparse.ArgumentParser, flag: str, example: str, help: str) -> None:
    """An option naming a file ``run`` writes (checked before the run); ``example``'s suffix is the file's kind."""
    suffix = Path(example).suffix
    p.add_argument(flag, type=argtypes.file_to_write(suffix, example), metavar=f"FILE{suffix}", help=help)


def _add_convert_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("convert", help="convert a Hugging Face model folder or .safetensors file to .slm")
    p.add_argument("source", help="model folder (config.json + safetensors) or a .safetensors file")
    p.add_argument("-o", "--output", required=True, type=argtypes.output_file, help="the .slm file to write")
    p.add_argument("--quant", choices=("int8", "none"), default="int8", help="int8: 2-D weights to int8 with per-row scales (default)")
    p.add_argument("--level", type=argtypes.zstd_level, help=argparse.SUPPRESS)  # deprecated: levels above 3 gain nothing on int8
    p.add_argument("--chunk-size", type=argtypes.chunk_size, default=1 << 20, help="raw bytes per chunk (default 1 MiB)")
    p.add_argument(
        "--progressive",
        action="store_true",
        help="store int8 matrices as coarse levels first and refinements after, so `run --progressive` can print a preview "
        "before the exact result (calibrated on a bundled text; about 1.3%% larger)",
    )
    p.add_argument("--config", help="config.json to use when the source has none beside it")
    p.add_argument(
        "--base",
        type=argtypes.base_model_file,
        metavar="OLD.slm",
        help="the previous version's .slm: keep its per-row scales where the error bound allows, and write beside the output "
        "a delta file that a client holding OLD fetches instead of the changed chunks (docs/updates.md)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--verbose", dest="tensor_table", action="store_true", help="also print every tensor's shape, dtype and error")
    p.set_defaults(func=_command("files", "cmd_convert"))


def _add_inspect_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("inspect", help="show a model file's layers, sizes, compression and quantization error")
    p.add_argument(
        "source",
        type=argtypes.model_file_or_url,
        help="a .slm file, its URL (only the manifest is fetched), or a cached model's name or digest prefix",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_header_option(p)
    p.add_argument(
        "--cache-dir", metavar="DIR", help=f"where a URL's cached header is read when its server cannot be reached ({_cache_dir_help()})"
    )
    p.set_defaults(func=_command("files", "cmd_inspect"))


def _add_verify_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("verify", help="check every chunk's sha256; exit status 0 only when the file is intact")
    p.add_argument(
        "file",
        type=argtypes.model_file_or_url,
        help="a local .slm file, or the name, digest prefix or URL of a cached model read from a file",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", metavar="DIR", help=_cache_dir_help())
    p.set_defaults(func=_command("files", "cmd_verify"))


def _add_serve_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("serve", help="serve the .slm files of a directory over HTTP (ranges, ETags, optional link emulation)")
    p.add_argument("directory", help="directory holding .slm files")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=argtypes.port, default=8800, help="port to listen on (default 8800; 0 takes a free port and prints it)")
    p.add_argument(
        "--rate",
        type=argtypes.parse_rate,
        metavar="RATE",
        help="limit each connection to RATE bytes per second (k, M, G: powers of 1024, as run --limit-rate)",
    )
    p.add_argument("--latency-ms", type=argtypes.milliseconds, default=0.0, help="delay every response by this many milliseconds")
    p.add_argument("--no-ranges", action="store_true", help="ignore Range headers (answer 200 with the whole file)")
    p.add_argument("-q", "--quiet", action="store_true", help="no access log on stderr")
    p.set_defaults(func=_command("files", "cmd_serve"))


def _add_fetch_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("fetch", help="download a model into the cache, verified, with a progress bar")
    add_source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_fetch)


def _add_run_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("run", help="stream a model and run it: embeddings for encoders, generation for decoders")
    add_source_arguments(p)
    _add_run_inputs(p)
    _add_decoder_options(p)
    p.add_argument(
        "--memory-budget",
        type=argtypes.memory_budget,
        default="auto",
        metavar="SIZE",
        help="memory the run may use, page cache included (e.g. 640M, 2G; 'none': no limit); default: $STREAMLOAD_MEMORY_BUDGET, "
        "else the memory limit of the process's cgroup. A decoder larger than it keeps what fits resident and reads the rest "
        "from the cache on every token",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (result, timeline, timings, bytes)")
    p.add_argument(
        "--no-finish", action="store_true", help="stop once the result is printed (default: complete the cache for the next run)"
    )
    p.add_argument(
        "--progressive",
        action="store_true",
        help="a model converted with --progressive: print a preview from the coarse weights first, then the exact result",
    )
    _add_file_to_write_option(p, "--timeline-png", "timeline.png", "draw download, decompress and compute per layer (needs matplotlib)")
    p.add_argument(
        "--link-rate",
        type=argtypes.parse_rate,
        metavar="RATE",
        help="mark the link floor (bytes downloaded / rate) on the picture",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run, command_parser=p)


def _add_run_inputs(p: argparse.ArgumentParser) -> None:
    """What ``run`` runs the model on: texts as arguments, --text or --ids (none of them: an interactive session)."""
    p.add_argument(
        "texts",
        nargs="*",
        type=argtypes.check_text,
        metavar="TEXT",
        help="input texts, as --text: streamload run MODEL 'a sentence' (one text each; after --, a text may start with '-'; "
        "a decoder joins them into one prompt)",
    )
    p.add_argument("--text", action="append", type=argtypes.check_text, help="input text (repeat for a batch of sentences with an encoder)")
    p.add_argument("--ids", type=argtypes.parse_ids, metavar="ID,ID,...", help="comma-separated token ids instead of text")


def _add_decoder_options(p: argparse.ArgumentParser) -> None:
    """``run``'s options for a decoder only (an encoder refuses them: ``check_run_options``); None when not given."""
    p.add_argument("--max-new-tokens", type=argtypes.token_count, metavar="N", help="decoder: tokens to generate (default 16)")
    p.add_argument("--temperature", type=argtypes.temperature, metavar="T", help="decoder: 0 is greedy (default)")
    p.add_argument("--top-p", type=argtypes.top_p, metavar="P", help="decoder: nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=argtypes.seed, metavar="N", help="decoder: sampling seed (default 0)")
    _add_file_to_write_option(
        p,
        "--save-logits",
        "logits.npy",
        "decoder: save the prompt's logits, float32 [prompt length, vocab] (numpy adds .npy to a name without it)",
    )


def _add_list_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("list", help="list the models in the cache")
    p.add_argument("--cache-dir", metavar="DIR", help=_cache_dir_help())
    p.add_argument("--json", action="store_true", help="print a JSON array: digest, architecture, size, status, sources, path")
    p.set_defaults(func=cmd_list)


def _add_rm_command(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("rm", help="delete a model from the cache")
    p.add_argument("digest", metavar="MODEL", help="the model's name, digest prefix, URL or file (see `streamload list`)")
    p.add_argument("--cache-dir", metavar="DIR", help=_cache_dir_help())
    p.set_defaults(func=cmd_rm)


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """What ``fetch`` and ``run`` share: the model to stream, the cache, and how it is downloaded."""
    p.add_argument(
        "source",
        help="http(s) URL of a .slm file (optionally #sha256=DIGEST), a local path, "
        "or a cached model's file name or digest prefix as `streamload list` shows them",
    )
    p.add_argument("--cache-dir", metavar="DIR", help=_cache_dir_help())
    p.add_argument("--digest", type=argtypes.digest, metavar="SHA256", help="refuse a model whose manifest sha256 differs")
    p.add_argument(
        "--connections", type=argtypes.connections, default=1, metavar="N", help="parallel ranged requests (default 1: strict layer order)"
    )
    _add_header_option(p)
    p.add_argument(
        "--limit-rate",
        type=argtypes.parse_rate,
        metavar="RATE",
        help=f"cap the download at RATE bytes/s (k, M, G: powers of 1024, as curl), over every connection and mirror "
        f"together (default ${LIMIT_RATE_ENV})",
    )
    p.add_argument(
        "--timeout",
        type=argtypes.timeout,
        metavar="SECONDS",
        help=f"give up on an attempt that connects, answers or sends nothing for this long (default ${TIMEOUT_ENV} or 30)",
    )
    p.add_argument(
        "--retries",
        type=argtypes.retries,
        metavar="N",
        help=f"attempts after the first failure before giving up (default ${RETRIES_ENV} or 5)",
    )
    p.add_argument(
        "--mirror",
        action="append",
        type=argtypes.mirror_url,
        metavar="URL",
        help="another URL of the same .slm file (repeat for more): the download is spread over all that serve the same "
        "manifest digest, by their measured rates (--connections requests each, at least 2); one serving another model is refused",
    )
