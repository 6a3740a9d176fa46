"""What both HTTP receive paths share: Range and If-Range, Content-Range, status mapping, Retry-After, backoff.

The threaded socket path (``rawhttp``) and the aiohttp path (``aiohttp_source``)
build their requests and judge their answers here, so that a server is treated
the same whichever path reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import random
import re
import time
import urllib.parse
from collections.abc import Mapping

from .errors import FetchError, HTTPStatusError, RetryableError, StalledError, UnreachableError, UsageError

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # RFC 9110 section 15.4; a ranged GET stays a ranged GET after each
# headers each request sets itself: a caller's value would break ranges, framing or the fast path's parsing
OWN_HEADERS = frozenset({"host", "range", "if-range", "accept-encoding", "connection", "content-length", "transfer-encoding", "te"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.1: a field name
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


# The HTTP paths' internal signals: outcomes one transport hands another, never errors a caller sees (not in the
# error tree, not exported). Each is caught in ``http_source`` or ``aiohttp_source``.


class TransportUnsupported(Exception):
    """This server or response needs the general HTTP client (aiohttp)."""


class TransportStatus(Exception):
    """The threaded path got an error status (mapped to a FetchError by the caller)."""

    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(f"status {status}")
        self.status = status
        self.retry_after = retry_after


class TransportNotModified(Exception):
    """Either HTTP path got a 304 to a conditional request (``If-None-Match``)."""


class TransportRedirect(Exception):
    """Either HTTP path got a redirect (RFC 9110 section 15.4); ``HttpSource`` follows it."""

    def __init__(self, status: int, location: str) -> None:
        super().__init__(f"status {status} to {location}")
        self.status = status
        self.location = location


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try before giving up; each field's unit is in its name."""

    max_attempts: int = 6  # consecutive failures without progress before a FetchError
    base_delay_s: float = 0.25  # first backoff; doubles each failure, with jitter
    max_delay_s: float = 20.0
    max_retry_after_s: float = 60.0  # a server's Retry-After is honoured up to this
    stall_timeout_s: float = 30.0  # no byte for this long: the connection is stalled
    connect_timeout_s: float = 15.0
    header_timeout_s: float = 30.0  # deadline for a whole response head, however slowly it trickles in
    min_rate_bytes_per_s: float = 1024.0  # a body slower than this over rate_window_s is stalled
    rate_window_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise UsageError(f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("base_delay_s", "max_delay_s", "max_retry_after_s", "min_rate_bytes_per_s"):
            if not getattr(self, name) >= 0:
                raise UsageError(f"RetryPolicy.{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("stall_timeout_s", "connect_timeout_s", "header_timeout_s", "rate_window_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"RetryPolicy.{name} must be more than 0 seconds, got {getattr(self, name)}")

    def delay_s(self, failures: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, failures - 1))
        return backoff * (0.5 + random.random() / 2)


def check_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A caller's extra request headers (``Authorization: Bearer ...``), checked: UsageError for one we cannot send.

    Refused: a name that is not an RFC 9110 token, a value holding CR, LF or NUL (it would
    end the header early: request splitting), and the headers each request sets itself.
    """
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not _TOKEN.match(name):
            raise UsageError(f"{name!r} is not a valid HTTP header name")
        if name.lower() in OWN_HEADERS:
            raise UsageError(f"the {name} header is set by streamload on each request; it cannot be given")
        if any(c in value for c in "\r\n\0"):
            raise UsageError(f"the value of the {name} header holds a line break or NUL")
        checked[name] = value.strip()
    return checked


def parse_header_option(text: str) -> tuple[str, str]:
    """``'Name: value'`` (as curl's -H takes it) -> (name, value); UsageError when there is no colon."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise UsageError(f"a header is 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def same_origin(url: str, other: str) -> bool:
    """Scheme, host and port all equal (RFC 6454): where a caller's credentials may be sent."""
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(other)
    defaults = {"http": 80, "https": 443}
    return (a.scheme, a.hostname, a.port or defaults.get(a.scheme)) == (b.scheme, b.hostname, b.port or defaults.get(b.scheme))


def range_headers(start: int, end: int | None, etag: str | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Request headers for bytes [start, end) (end None: to the end of the file).

    ``bytes=0-`` is sent too: a 206 to it says the server honours Range, a 200 that it does not.

    If-Range carries a strong ETag only (RFC 9110 section 13.1.5): if the file changed,
    the server sends all of the new one instead of a mix of old and new. ``extra`` (checked
    by ``check_headers``) comes first, so the range headers cannot be overridden.
    """
    headers = {**(extra or {}), "Accept-Encoding": "identity"}
    headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
    if etag and not etag.startswith("W/"):
        headers["If-Range"] = etag
    return headers


def parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """``bytes first-last/total`` -> (first, last, total or None for ``*``); None when malformed."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


def parse_retry_after(value: str | None) -> float | None:
    """RFC 9110 section 10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def http_status_error(url: str, status: int, reason: str, retry_after: str | None) -> FetchError:
    """The error for an unusable status: retryable ones carry the server's Retry-After."""
    if status in RETRYABLE_STATUSES:
        return RetryableError(f"{url} answered {status} {reason}".rstrip(), parse_retry_after(retry_after))
    if status == 404:
        return HTTPStatusError(f"no model at {url} (404); check the URL", status=status)
    if status == 416:
        return HTTPStatusError(f"{url} refused a byte range (416): the file on the server is shorter than its manifest says", status=status)
    return HTTPStatusError(f"{url} answered {status} {reason}".rstrip(), status=status)


class Backoff:
    """Counts failures in a row and waits before the next attempt; gives up with a FetchError after max_attempts."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.failures = 0

    async def wait(self, exc: RetryableError | StalledError, *, progressed: bool = False) -> None:
        """After a failed attempt: progress since the last failure starts the count again."""
        self.failures = 0 if progressed else self.failures + 1
        if self.failures >= self.policy.max_attempts:
            hint = "; is the server running, and is the address right?" if isinstance(exc, UnreachableError) else ""
            raise FetchError(f"gave up {self.what} after {self.failures} failed attempts in a row: {exc}{hint}") from None
        delay = self.policy.delay_s(max(1, self.failures), exc.retry_after_s if isinstance(exc, RetryableError) else None)
        logger.warning("%s (failure %d of %d); retrying in %.1f s", exc, self.failures, self.policy.max_attempts, delay)
        await asyncio.sleep(delay)
