"""Where a command's model comes from: a URL, a file, or a cached model by name or digest; ``list`` and ``rm``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..cache.files import default_cache_dir
from ..download.origin import is_url
from ..errors import StreamloadError
from .output import EXIT_FAILURE, EXIT_OK, format_bytes

TOKEN_ENV = "STREAMLOAD_TOKEN"  # a bearer token for private models, as HF_TOKEN is for huggingface_hub
LIMIT_RATE_ENV = "STREAMLOAD_LIMIT_RATE"  # --limit-rate's default
TIMEOUT_ENV = "STREAMLOAD_TIMEOUT"  # --timeout's default, seconds
RETRIES_ENV = "STREAMLOAD_RETRIES"  # --retries' default


def cache_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


# host[:port]/path, the way a URL reads without its scheme ("127.0.0.1:8800/minilm.slm", "cdn.example/m.slm")
_SCHEMELESS_URL = re.compile(r"^(localhost|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+)(:\d+)?/")


def resolve_source(args: argparse.Namespace, verb: str) -> bool:
    """Let SOURCE name a cached model the way `streamload list` shows it: a digest prefix or a file name.

    A URL or an existing path is used as given. Otherwise SOURCE is looked up in the cache; one match becomes its
    URL pinned to its digest (a complete copy then needs no network) and stderr says which model it is.
    False (after a one-line error) when nothing fits.
    """
    source = args.source
    if Path(source).is_dir():
        hint = f"; a Hugging Face model folder? convert it first: streamload convert {source} -o model.slm"
        config = (Path(source) / "config.json").is_file()
        print(f"error: {source} is a directory: give a .slm file in it{hint if config else ''}", file=sys.stderr)
        return False
    if is_url(source) or Path(source).exists():
        return True
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", source):
        print(f"error: {source}: only http:// and https:// URLs are supported", file=sys.stderr)
        return False
    from ..cache.listing import find_cached_models
    from ..download.origin import resolve_cached_source

    root = cache_dir_of(args)
    try:
        origin, digest = resolve_cached_source(root, source)
    except StreamloadError as exc:
        hint = f"; did you mean http://{source} ?" if _SCHEMELESS_URL.match(source) and not source.startswith("/") else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
        return False
    if args.digest is not None and args.digest.lower().removeprefix("sha256:") != digest:
        print(f"error: {source!r} is the cached model {digest[:12]}, not --digest {args.digest}", file=sys.stderr)
        return False
    model = find_cached_models(root, digest)[0]
    status = "complete" if model.complete else f"partial: the rest comes from {'its URL' if is_url(origin) else 'the file'}"
    print(f"{verb} cached {file_name(origin)} sha256:{digest[:12]} ({status}) from {origin}", file=sys.stderr)
    args.source, args.digest = origin, digest
    return True


def file_name(url: str) -> str:
    return url.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1]  # a ref's query is redacted ("?***")


def open_model(args: argparse.Namespace, progress: Any) -> Any:
    """``streamload.open`` with the options ``fetch`` and ``run`` share."""
    from .. import model as streamload_model

    return streamload_model.open(
        args.source,
        cache_dir=cache_dir_of(args),
        digest=args.digest,
        connections=args.connections,
        progress=progress,
        headers=request_headers(args),
        mirrors=args.mirror or (),
        retry=retry_policy(args),
    )


def retry_policy(args: argparse.Namespace) -> Any:
    """The network policy from --limit-rate, --timeout and --retries, or their environment variables (read here, at the
    command line's edge). Raises UsageError for a bad environment value (exit status 2, as a bad flag)."""
    from ..errors import UsageError
    from ..transport.httputil import RetryPolicy
    from .argtypes import parse_rate, retries, timeout

    def option(name: str, env: str, parse: Any) -> Any:
        value = getattr(args, name, None)
        if value is None and os.environ.get(env, "").strip():
            try:
                value = parse(os.environ[env].strip())
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"${env}: {exc}") from None
        return value

    fields: dict[str, Any] = {}
    rate, timeout_s = option("limit_rate", LIMIT_RATE_ENV, parse_rate), option("timeout", TIMEOUT_ENV, timeout)
    retry_count = option("retries", RETRIES_ENV, retries)
    if rate is not None:
        fields["limit_rate_bytes_per_s"] = rate
    if timeout_s is not None:
        fields |= {"stall_timeout_s": timeout_s, "header_timeout_s": timeout_s, "connect_timeout_s": timeout_s}
    if retry_count is not None:
        fields["max_attempts"] = retry_count + 1
    return RetryPolicy(**fields)


def request_headers(args: argparse.Namespace) -> dict[str, str]:
    """The --header options, then ``$STREAMLOAD_TOKEN`` as a bearer token when no Authorization header was given."""
    headers = dict(args.header or [])
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not any(name.lower() == "authorization" for name in headers):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def cmd_list(args: argparse.Namespace) -> int:
    from ..cache.listing import list_cached_models, model_name
    from ..formats.reader import read_header

    rows = []
    for cached in list_cached_models(cache_dir_of(args)):
        architecture, manifest = "?", None
        if cached.header is not None:
            try:
                _, manifest = read_header(cached.header, None)
                architecture = manifest.architecture
            except StreamloadError:
                architecture = "damaged"
            if manifest is not None and manifest.digest != cached.digest:  # another model's header: fetched again on use
                architecture, manifest = "damaged", None
        status = "complete" if cached.complete else f"partial {_done_percent(cached.directory, manifest)}%"
        if not cached.complete and _being_written(cached.directory):  # the journal trails a running download by seconds
            status = f"downloading, {_done_percent(cached.directory, manifest)}%+"
        rows.append(
            {
                "name": model_name(cached.sources),
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
    width = max(4, *(len(row["name"]) for row in rows))
    print(f"{'NAME':<{width}}  {'DIGEST':<14} {'ARCH':<8} {'ON DISK':>10} {'STATUS':<18} SOURCE")  # decompressed: more than the .slm
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['digest'][:12]:<14} {row['architecture']:<8} {format_bytes(row['size_bytes']):>10} "
            f"{row['status']:<18} {', '.join(row['sources']) or '-'}"
        )
    return EXIT_OK


def _being_written(directory: Path) -> bool:
    """Another process holds the model's writer lock (a shared lock taken and released at once, as a probe)."""
    import fcntl

    try:
        fd = os.open(directory / "lock", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _done_percent(directory: Path, manifest: Any) -> int:
    """Percent of the compressed bytes in the cache, the measure the progress bar shows (chunks differ in size)."""
    from ..cache.files import JOURNAL_NAME, JOURNAL_RECORD, read_own_file

    if manifest is None:
        return 0
    try:
        data = read_own_file(directory / JOURNAL_NAME)
    except OSError:
        return 0
    sizes = {c.index: c.size_bytes for c in manifest.file_order_chunks()}  # a progressive model's refinements too
    done = {index for index, _ in JOURNAL_RECORD.iter_unpack(data[: len(data) - len(data) % JOURNAL_RECORD.size]) if index in sizes}
    return int(100 * sum(sizes[i] for i in done) / max(1, sum(sizes.values())))


def cmd_rm(args: argparse.Namespace) -> int:
    from ..cache.listing import find_cached_models, model_name, remove_cached_model

    root = cache_dir_of(args)
    source = args.digest
    if not is_url(source) and Path(source).is_file():  # a file: the cached model of its manifest
        from ..formats import ModelReader

        with ModelReader(source) as reader:
            source = reader.manifest.digest
    matches = find_cached_models(root, source)
    if len(matches) != 1:
        listed = "; ".join(f"{model_name(m.sources)} sha256:{m.digest[:12]}" for m in matches)
        what = f"names {len(matches)} cached models ({listed}): give a digest prefix" if matches else "names no cached model"
        print(f"error: {args.digest!r} {what} (see `streamload list`)", file=sys.stderr)
        return EXIT_FAILURE
    remove_cached_model(root, matches[0].digest)
    print(f"deleted {matches[0].digest[:12]} ({format_bytes(matches[0].size_bytes)})")
    return EXIT_OK
