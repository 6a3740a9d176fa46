"""A URL's ref in the cache: which model (manifest digest) it last served, and the ETag its server gave it.

    <cache_dir>/refs/<sha256(url)>   "<digest>\\n<url>", then "\\n<etag>" when the server gave one

A complete model from a URL is used offline through its ref, and revalidated with one conditional request
(If-None-Match with the ETag kept here). A local file's ref holds its absolute path in place of the URL: it lets
``streamload run NAME`` find the file again (``streamload list`` shows it as the model's source).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .cache import cache_error, write_atomically


def ref_path(root: Path, url: str) -> Path:
    return root / "refs" / hashlib.sha256(url.encode()).hexdigest()


def read_ref(root: Path, url: str) -> str | None:
    """The digest a URL had when last fetched."""
    return parse_ref(ref_path(root, url))[0] or None


def read_ref_etag(root: Path, url: str) -> str | None:
    """The ETag the URL's server gave that digest, when it gave one."""
    try:
        lines = ref_path(root, url).read_text().split("\n")
    except OSError:
        return None
    return (lines[2].strip() or None) if len(lines) > 2 else None


def write_ref(root: Path, url: str, digest: str, etag: str | None = None) -> None:
    path = ref_path(root, url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, f"{digest}\n{url}".encode() + (f"\n{etag}".encode() if etag else b""))
    except OSError as exc:
        raise cache_error("writing", path, exc) from None


def parse_ref(path: Path) -> tuple[str, str]:
    """(digest, url) of a ref file ("", "" when unreadable)."""
    try:
        digest, _, rest = path.read_text().partition("\n")
    except OSError:
        return "", ""
    return digest.strip(), rest.partition("\n")[0].strip()
