"""The ``streamload`` argument parser: its commands and options, and argument types whose bad values are one-line errors
(exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ..cache.files import default_cache_dir
from ..errors import StreamloadError, UsageError
from ..formats.constants import MAX_CHUNK_RAW_SIZE_BYTES
from ..transport.httputil import parse_header_option
from .cached import LIMIT_RATE_ENV, RETRIES_ENV, TIMEOUT_ENV, TOKEN_ENV, cmd_list, cmd_rm, is_url
from .files import cmd_convert, cmd_inspect, cmd_serve, cmd_verify
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


def _header_option(text: str) -> tuple[str, str]:
    try:
        return parse_header_option(text)
    except StreamloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


def _memory_budget(text: str) -> int | str | None:
    """--memory-budget: a size (640M, 2G, bytes), 'none', or 'auto' (the default: $STREAMLOAD_MEMORY_BUDGET, else the cgroup's)."""
    from ..runtime.memory import NO_BUDGET_WORDS, parse_size_bytes

    if text.strip().lower() in NO_BUDGET_WORDS:
        return None
    if text.strip().lower() == "auto":
        return "auto"
    try:
        size = parse_size_bytes(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError("a memory budget must be more than 0 bytes ('none' for no limit)")
    return size


_top_p = _number(float, "a probability mass in (0, 1]", above=0, high=1)
_seed = _number(int, "a seed of 0 or more", low=0)
_zstd_level = _number(int, "a zstd level from 1 to 22", low=1, high=22)
_chunk_size = _number(int, f"a chunk size from 1 to {MAX_CHUNK_RAW_SIZE_BYTES} bytes", low=1, high=MAX_CHUNK_RAW_SIZE_BYTES)


def parse_rate(text: str) -> float:
    """Bytes per second as curl's --limit-rate takes them: a number with an optional k, M or G (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgG]?)[bB]?\s*", text)
    value = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()] if match else 0.0
    if not match or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in bytes per second above 0 (e.g. 500k, 2M, 1G: powers of 1024)")
    return value


_limit_rate = parse_rate
_timeout = _number(float, "a timeout in seconds above 0", above=0)
_retries = _number(int, "a number of retries, 0 or more", low=0, high=1000)


def _parse_ids(text: str) -> list[int]:
    parts = [part for part in text.replace(" ", "").split(",") if part]
    if not parts or not all(re.fullmatch(r"\d+", part) for part in parts):
        raise argparse.ArgumentTypeError(f"takes comma-separated token ids (integers 0 or more), got {text!r}")
    return [int(part) for part in parts]


def check_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the text is empty: give at least one word")
    return text


def _digest(text: str) -> str:
    digest = text.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 digest (64 hex digits; `streamload inspect` prints it)")
    return digest


def _output_file(text: str) -> str:
    if text.endswith(("/", os.sep)):
        example = text.rstrip("/" + os.sep) + "/model.slm"
        raise argparse.ArgumentTypeError(f"{text} names a directory: give the .slm file to write, e.g. {example}")
    directory = Path(text).parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {directory} does not exist: create it first (mkdir -p {directory})")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give the .slm file to write")
    return text


def _file_to_write(kind: str, example: str) -> Callable[[str], str]:
    """An argparse type for a file ``run`` writes: not a directory, in a directory that exists (checked before the run)."""

    def check(text: str) -> str:
        if text.endswith(("/", os.sep)) or Path(text).is_dir():
            name = text.rstrip("/" + os.sep) or "."
            raise argparse.ArgumentTypeError(f"{name} is a directory: give the {kind} file to write, e.g. {name}/{example}")
        directory = Path(text).parent
        if not directory.is_dir():
            raise argparse.ArgumentTypeError(f"the directory {directory} does not exist: create it first (mkdir -p {directory})")
        return text

    return check


def _model_file_or_url(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a .slm file in it")
    return text


def _mirror_url(text: str) -> str:
    if not is_url(text):
        raise argparse.ArgumentTypeError(f"a mirror is an http(s) URL of the same .slm file, got {text!r}")
    return text


def _base_model_file(text: str) -> str:
    if is_url(text) or not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a local .slm file: --base takes the previous version's file")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: the message and where to read more, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--level", type=_zstd_level, help=argparse.SUPPRESS)  # deprecated: levels above 3 gain nothing on int8
    p.add_argument("--chunk-size", type=_chunk_size, default=1 << 20, help="raw bytes per chunk (default 1 MiB)")
    p.add_argument(
        "--progressive",
        action="store_true",
        help="store int8 matrices as coarse levels first and refinements after, so `run --progressive` can print a preview "
        "before the exact result (calibrated on a bundled text; about 1.3%% larger)",
    )
    p.add_argument("--config", help="config.json to use when the source has none beside it")
    p.add_argument(
        "--base",
        type=_base_model_file,
        metavar="OLD.slm",
        help="the previous version's .slm: keep its per-row scales where the error bound allows, and write beside the output "
        "a delta file that a client holding OLD fetches instead of the changed chunks (docs/updates.md)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.add_argument("--verbose", dest="tensor_table", action="store_true", help="also print every tensor's shape, dtype and error")
    p.set_defaults(func=cmd_convert)

    p = commands.add_parser("inspect", help="show a model file's layers, sizes, compression and quantization error")
    p.add_argument(
        "source",
        type=_model_file_or_url,
        help="a .slm file, its URL (only the manifest is fetched), or a cached model's name or digest prefix",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--header", action="append", type=_header_option, metavar="'NAME: VALUE'", help=HEADER_HELP)
    p.add_argument("--cache-dir", help="where a URL's cached header is read when its server cannot be reached (" + cache_help + ")")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("verify", help="check every chunk's sha256; exit status 0 only when the file is intact")
    p.add_argument(
        "file", type=_model_file_or_url, help="a local .slm file, or the name, digest prefix or URL of a cached model read from a file"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cache-dir", help=cache_help)
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
    p.add_argument(
        "texts",
        nargs="*",
        type=check_text,
        metavar="TEXT",
        help="input texts, as --text: streamload run MODEL 'a sentence' (one text each; after --, a text may start with '-'; "
        "a decoder joins them into one prompt)",
    )
    p.add_argument("--text", action="append", type=check_text, help="input text (repeat for a batch of sentences with an encoder)")
    p.add_argument("--ids", type=_parse_ids, help="comma-separated token ids instead of text")
    p.add_argument("--max-new-tokens", type=_token_count, help="decoder: tokens to generate (default 16)")
    p.add_argument("--temperature", type=_temperature, help="decoder: 0 is greedy (default)")
    p.add_argument("--top-p", type=_top_p, help="decoder: nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=_seed, help="decoder: sampling seed (default 0)")
    p.add_argument(
        "--save-logits",
        type=_file_to_write(".npy", "logits.npy"),
        metavar="FILE.npy",
        help="decoder: save the prompt's logits, float32 [prompt length, vocab] (numpy adds .npy to a name without it)",
    )
    p.add_argument(
        "--memory-budget",
        type=_memory_budget,
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
    p.add_argument(
        "--timeline-png",
        type=_file_to_write(".png", "timeline.png"),
        metavar="FILE.png",
        help="draw download, decompress and compute per layer (needs matplotlib)",
    )
    p.add_argument(
        "--link-rate", type=_positive_rate, metavar="BYTES_PER_S", help="mark the link floor (bytes downloaded / rate) on the picture"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run, command_parser=p)

    p = commands.add_parser("list", help="list the models in the cache")
    p.add_argument("--cache-dir", help=cache_help)
    p.add_argument("--json", action="store_true", help="print a JSON array: digest, architecture, size, status, sources, path")
    p.set_defaults(func=cmd_list)

    p = commands.add_parser("rm", help="delete a model from the cache")
    p.add_argument("digest", metavar="MODEL", help="the model's name, digest prefix, URL or file (see `streamload list`)")
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
        "--limit-rate",
        type=_limit_rate,
        metavar="RATE",
        help=f"cap the download at RATE bytes/s (k, M, G: powers of 1024, as curl), over every connection and mirror "
        f"together (default ${LIMIT_RATE_ENV})",
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        metavar="SECONDS",
        help=f"give up on an attempt that connects, answers or sends nothing for this long (default ${TIMEOUT_ENV} or 30)",
    )
    p.add_argument(
        "--retries",
        type=_retries,
        metavar="N",
        help=f"attempts after the first failure before giving up (default ${RETRIES_ENV} or 5)",
    )
    p.add_argument(
        "--mirror",
        action="append",
        type=_mirror_url,
        metavar="URL",
        help="another URL of the same .slm file (repeat for more): the download is spread over all that serve the same "
        "manifest digest, by their measured rates (--connections requests each, at least 2); one serving another model is refused",
    )
