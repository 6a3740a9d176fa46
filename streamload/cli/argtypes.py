"""The ``streamload`` options' argument types: each turns a word into a value or refuses it with a message that says
what was expected (argparse makes it a one-line error, exit status 2)."""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import StreamloadError, UsageError
from ..formats.constants import MAX_CHUNK_RAW_SIZE_BYTES
from ..transport.httputil import parse_header_option
from .cached import is_url


def header_option(text: str) -> tuple[str, str]:
    try:
        return parse_header_option(text)
    except StreamloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def number(kind: Callable[[str], Any], what: str, *, low: float | None = None, high: float | None = None, above: float | None = None):
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


port = number(int, "a port number in 0..65535 (0: any free port)", low=0, high=65535)
milliseconds = number(float, "a delay of 0 ms or more", low=0)
connections = number(int, "a number of connections from 1 to 64", low=1, high=64)
token_count = number(int, "a number of tokens, 0 or more", low=0)
temperature = number(float, "a temperature of 0 (greedy) or more", low=0)
top_p = number(float, "a probability mass in (0, 1]", above=0, high=1)
seed = number(int, "a seed of 0 or more", low=0)
zstd_level = number(int, "a zstd level from 1 to 22", low=1, high=22)
chunk_size = number(int, f"a chunk size from 1 to {MAX_CHUNK_RAW_SIZE_BYTES} bytes", low=1, high=MAX_CHUNK_RAW_SIZE_BYTES)
timeout = number(float, "a timeout in seconds above 0", above=0)
retries = number(int, "a number of retries, 0 or more", low=0, high=1000)


def memory_budget(text: str) -> int | str | None:
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


def parse_rate(text: str) -> float:
    """Bytes per second as curl's --limit-rate takes them: a number with an optional k, M or G (powers of 1024)."""
    match = re.fullmatch(r"\s*((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    value = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()] if match else 0.0
    if not match or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate in bytes per second above 0 (e.g. 500k, 2M, 1G: powers of 1024)")
    return value


def parse_ids(text: str) -> list[int]:
    parts = [part for part in text.replace(" ", "").split(",") if part]
    if not parts or not all(re.fullmatch(r"\d+", part) for part in parts):
        raise argparse.ArgumentTypeError(f"takes comma-separated token ids (integers 0 or more), got {text!r}")
    return [int(part) for part in parts]


def check_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the text is empty: give at least one word")
    return text


def digest(text: str) -> str:
    hex_digest = text.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a sha256 digest (64 hex digits; `streamload inspect` prints it)")
    return hex_digest


def output_file(text: str) -> str:
    if text.endswith(("/", os.sep)):
        example = text.rstrip("/" + os.sep) + "/model.slm"
        raise argparse.ArgumentTypeError(f"{text} names a directory: give the .slm file to write, e.g. {example}")
    directory = Path(text).parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"the directory {directory} does not exist: create it first (mkdir -p {directory})")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give the .slm file to write")
    return text


def file_to_write(kind: str, example: str) -> Callable[[str], str]:
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


def model_file_or_url(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory: give a .slm file in it")
    return text


def mirror_url(text: str) -> str:
    if not is_url(text):
        raise argparse.ArgumentTypeError(f"a mirror is an http(s) URL of the same .slm file, got {text!r}")
    return text


def base_model_file(text: str) -> str:
    if is_url(text) or not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a local .slm file: --base takes the previous version's file")
    return text
