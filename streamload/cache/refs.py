"""A URL's ref in the cache: which model (manifest digest) it last served, and the ETag its server gave it.

    <cache_dir>/refs/<sha256(url)>   "<digest>\\n<url>", then "\\n<etag>" when the server gave one

A complete model from a URL is used offline through its ref, and revalidated with one conditional request
(If-None-Match with the ETag kept here). A local file's ref holds its absolute path in place of the URL: it lets
``streamload run NAME`` find the file again (``streamload list`` shows it as the model's source).

A ref is bookkeeping: one that cannot be read, or does not hold a sha256 digest, is treated as absent; one that
cannot be written on a read-only file system is skipped (a debug log).

The file is named by the hash of the whole URL, but holds the URL with its password and query string redacted
(``errors.redact_urls``): a signed URL's token or a password is never written to the cache in plain text. A cached
model found by name from such a ref is used pinned (a complete one needs no network); the rest of a partial one needs
its URL given again.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from ..errors import redact_urls
from ..transport.httputil import parse_etag
from .files import READ_ONLY_ERRNOS, REFS_DIR, cache_error, make_own_directory, read_own_file, write_atomically

logger = logging.getLogger(__name__)

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_REF_BYTES = 64 << 10  # a digest, a URL, an ETag: a larger ref is damaged, never read whole


def ref_path(root: Path, url: str) -> Path:
    return root / REFS_DIR / hashlib.sha256(url.encode()).hexdigest()


def read_ref(root: Path, url: str) -> str | None:
    """The digest a URL had when last fetched."""
    return parse_ref(ref_path(root, url))[0] or None


def read_ref_etag(root: Path, url: str) -> str | None:
    """The ETag the URL's server gave that digest, when it gave one."""
    lines = _read_lines(ref_path(root, url))
    if len(lines) < 3 or not SHA256_HEX.fullmatch(lines[0].strip()):
        return None
    return parse_etag(lines[2])  # a damaged ref's is never sent (If-None-Match)


def write_ref(root: Path, url: str, digest: str, etag: str | None = None) -> None:
    path = ref_path(root, url)
    data = f"{digest}\n{redact_urls(url)}".encode() + (f"\n{etag}".encode() if etag else b"")
    try:
        if _read_lines(path) == data.decode().split("\n"):
            return  # unchanged: nothing to write (a read-only cache stays usable)
        root.mkdir(parents=True, exist_ok=True)
        make_own_directory(root / REFS_DIR)
        write_atomically(path, data)
    except OSError as exc:
        if exc.errno in READ_ONLY_ERRNOS:
            logger.debug("cannot write the ref of %s (%s); the cache is read-only", url, exc.strerror)
            return
        raise cache_error("writing", path, exc) from None


def parse_ref(path: Path) -> tuple[str, str]:
    """(digest, url) of a ref file ("", "" when unreadable or when its first line is not a sha256 hex digest); the URL
    redacted, also in a ref written before it was."""
    lines = _read_lines(path)
    digest = lines[0].strip() if lines else ""
    if not SHA256_HEX.fullmatch(digest):
        if lines:
            logger.debug("%s does not start with a sha256 digest; ignoring it", path)
        return "", ""
    return digest, redact_urls(lines[1].strip()) if len(lines) > 1 else ""


def _read_lines(path: Path) -> list[str]:
    try:
        return read_own_file(path, MAX_REF_BYTES).decode(errors="replace").split("\n")
    except OSError:
        return []
