"""A URL's ref in the cache: which model (manifest digest) it last served, and the ETag its server gave it.

    <cache_dir>/refs/<sha256(url)>   "<digest>\\n<url>", then "\\n<etag>" when the server gave one

A complete model from a URL is used offline through its ref, and revalidated with one conditional request
(If-None-Match with the ETag kept here). A local file's ref holds its absolute path in place of the URL: it lets
``streamload run NAME`` find the file again (``streamload list`` shows it as the model's source).

The file is named by the hash of the whole URL, but holds the URL with its password and query string redacted
(``errors.redact_urls``): a signed URL's token or a password is never written to the cache in plain text. A cached
model found by name from such a ref is used pinned (a complete one needs no network); the rest of a partial one needs
its URL given again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .cache import cache_error, write_atomically
from .errors import redact_urls
from .httputil import parse_etag


def ref_path(root: Path, url: str) -> Path:
    return root / "refs" / hashlib.sha256(url.encode()).hexdigest()


def read_ref(root: Path, url: str) -> str | None:
    """The digest a URL had when last fetched."""
    return parse_ref(ref_path(root, url))[0] or None


def read_ref_etag(root: Path, url: str) -> str | None:
    """The ETag the URL's server gave that digest, when it gave one."""
    try:
        lines = ref_path(root, url).read_text().split("\n")
    except (OSError, UnicodeDecodeError):
        return None
    return parse_etag(lines[2]) if len(lines) > 2 else None  # a damaged ref's is never sent (If-None-Match)


def write_ref(root: Path, url: str, digest: str, etag: str | None = None) -> None:
    path = ref_path(root, url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, f"{digest}\n{redact_urls(url)}".encode() + (f"\n{etag}".encode() if etag else b""))
    except OSError as exc:
        raise cache_error("writing", path, exc) from None


def parse_ref(path: Path) -> tuple[str, str]:
    """(digest, url) of a ref file ("", "" when unreadable); the URL redacted, also in a ref written before it was."""
    try:
        digest, _, rest = path.read_text().partition("\n")
    except (OSError, UnicodeDecodeError):
        return "", ""
    return digest.strip(), redact_urls(rest.partition("\n")[0].strip())
