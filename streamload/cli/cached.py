"""Where a command's model comes from: a URL, a file, or a cached model by name or digest; ``list`` and ``rm``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..cache import default_cache_dir
from ..errors import StreamloadError
from ..origin import is_url
from .output import EXIT_FAILURE, EXIT_OK, format_bytes

TOKEN_ENV = "STREAMLOAD_TOKEN"  # a bearer token for private models, as HF_TOKEN is for huggingface_hub


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
    from ..cachedir import list_cached_models

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
    root = cache_dir_of(args)
    cached = list_cached_models(root)
    by_name = [m for m in cached if {source, source + ".slm"} & {file_name(url) for url in m.sources}]
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
    urls = [s for s in model.sources if is_url(s)]
    files = [s for s in model.sources if not is_url(s) and Path(s).is_file()]
    if not urls and not files:
        gone = f" ({' and '.join(model.sources)} {'is' if len(model.sources) == 1 else 'are'} gone)" if model.sources else ""
        print(f"error: cached model {model.digest[:12]} came from a local file{gone}: give the file's path or a URL", file=sys.stderr)
        return False
    if args.digest is not None and args.digest.lower().removeprefix("sha256:") != model.digest:
        print(f"error: {source!r} is the cached model {model.digest[:12]}, not --digest {args.digest}", file=sys.stderr)
        return False
    origin = (urls or files)[0]  # a URL pinned to the digest needs no network when the copy is complete
    status = "complete" if model.complete else f"partial: the rest comes from {'its URL' if urls else 'the file'}"
    print(f"{verb} cached {file_name(origin)} sha256:{model.digest[:12]} ({status}) from {origin}", file=sys.stderr)
    args.source, args.digest = origin, model.digest
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
    )


def request_headers(args: argparse.Namespace) -> dict[str, str]:
    """The --header options, then ``$STREAMLOAD_TOKEN`` as a bearer token when no Authorization header was given."""
    headers = dict(args.header or [])
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not any(name.lower() == "authorization" for name in headers):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def cmd_list(args: argparse.Namespace) -> int:
    from ..cachedir import list_cached_models
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
    print(f"{'DIGEST':<14} {'ARCH':<8} {'ON DISK':>10} {'STATUS':<13} SOURCE")  # decompressed: more than the .slm
    for row in rows:
        print(
            f"{row['digest'][:12]:<14} {row['architecture']:<8} {format_bytes(row['size_bytes']):>10} "
            f"{row['status']:<13} {', '.join(row['sources']) or '-'}"
        )
    return EXIT_OK


def _done_percent(directory: Path, manifest: Any) -> int:
    """Percent of the compressed bytes in the cache, the measure the progress bar shows (chunks differ in size)."""
    from ..cache import JOURNAL_NAME, JOURNAL_RECORD

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
    from ..cachedir import list_cached_models, remove_cached_model

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
