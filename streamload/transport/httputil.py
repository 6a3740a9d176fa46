"""What both HTTP receive paths share: Range and If-Range, Content-Range, status mapping, Retry-After, backoff.

The threaded socket path (``rawhttp``) and the aiohttp path (``aiohttp_source``)
build their requests and judge their answers here, so that a server is treated
the same whichever path reads it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping

from ..errors import (
    FetchError,
    HTTPStatusError,
    InvalidURLError,
    MalformedResponseError,
    RetryableError,
    StalledError,
    UnreachableError,
    UsageError,
    redact_urls,
)
from .ratelimit import RateLimiter

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})  # RFC 9110 section 15.4; a ranged GET stays a ranged GET after each
# headers each request sets itself: a caller's value would break ranges, framing or the fast path's parsing
OWN_HEADERS = frozenset({"host", "range", "if-range", "accept-encoding", "connection", "content-length", "transfer-encoding", "te"})
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 section 5.1: a field name
# numbers a response gives: ASCII digits only (str.isdigit and int() take '²' and other scripts' digits) and at most
# 19 of them (under 2**63; int() refuses 4300 and more with ValueError)
_DECIMAL = re.compile(r"[0-9]{1,19}")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_ETAG = re.compile(r'(W/)?"[\x21\x23-\x7e]*"')  # RFC 9110 section 8.8.3, without obs-text: it goes back in If-Range
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")  # RFC 9110 section 5.5 without obs-text: what both paths send alike
_URL_CONTROL = re.compile(r"[\x00-\x20\x7f]")  # would end or split the request line; a space is sent as %20


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
    limit_rate_bytes_per_s: float | None = None  # a cap on the whole download (every connection and mirror together)
    limiter: RateLimiter | None = dataclasses.field(default=None, init=False, repr=False, compare=False)  # its one bucket

    def __post_init__(self) -> None:
        if self.limit_rate_bytes_per_s is not None:
            if not self.limit_rate_bytes_per_s > 0 or not math.isfinite(self.limit_rate_bytes_per_s):
                raise UsageError(f"RetryPolicy.limit_rate_bytes_per_s must be more than 0, got {self.limit_rate_bytes_per_s}")
            object.__setattr__(self, "limiter", RateLimiter(self.limit_rate_bytes_per_s))
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
    end the header early: request splitting) or any other control or non-ASCII character,
    and the headers each request sets itself.
    """
    checked: dict[str, str] = {}
    for name, value in (headers or {}).items():
        if not _TOKEN.match(name):
            raise UsageError(f"{name!r} is not a valid HTTP header name")
        if name.lower() in OWN_HEADERS:
            raise UsageError(f"the {name} header is set by streamload on each request; it cannot be given")
        if any(c in value for c in "\r\n\0"):
            raise UsageError(f"the value of the {name} header holds a line break or NUL")
        if not _FIELD_VALUE.fullmatch(value):  # the socket path sends latin-1 (a '€' raised UnicodeEncodeError)
            raise UsageError(f"the value of the {name} header holds a control or non-ASCII character; send printable ASCII")
        checked[name] = value.strip()
    return checked


SESSION_HEADERS_ALLOWED = frozenset({"user-agent", "accept", "accept-language"})  # a borrowed session may set these: no credential


def check_session(session: object) -> None:
    """A borrowed ``aiohttp.ClientSession``: UsageError when it carries default headers or auth.

    aiohttp adds a session's default headers and ``auth`` to every request it sends, and they cannot be left out of
    one request: they would reach a redirect target on another host and mirrors on other origins, where the caller's
    ``headers=`` never go (credentials to the URL's origin only, RFC 6454). Such a session is refused rather than
    stripped; give its credentials as ``headers=``. Cookies are the session's jar's, which keeps them to their domains.
    """
    if session is None:
        return
    names = sorted(name for name in getattr(session, "headers", {}) if name.lower() not in SESSION_HEADERS_ALLOWED)
    if getattr(session, "auth", None) is not None:
        names.append("auth")
    if names:
        raise UsageError(
            f"the borrowed aiohttp session sends {', '.join(names)} to every host, redirect targets and mirrors included: "
            "give credentials as headers=..., which go to the URL's origin only"
        )


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


def check_url(url: str) -> str:
    """An http(s) URL from a caller or a server's Location, checked where it enters: the URL, non-ASCII characters in its
    path and query percent-encoded (UTF-8, as browsers send them); InvalidURLError naming it and what is wrong.

    Example:
        >>> check_url("http://127.0.0.1:99999/m.slm")
        Traceback (most recent call last):
        streamload.errors.InvalidURLError: 'http://127.0.0.1:99999/m.slm' is not a usable URL: port 99999 is out of range (1-65535)
    """
    if _URL_CONTROL.search(url.replace(" ", "")):  # first: urlsplit drops CR, LF and tab without a word
        raise InvalidURLError(f"{_shown(redact_urls(url))} is not a usable URL: it holds a control character")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # "Invalid IPv6 URL", "Port out of range 0-65535", "Port could not be cast to integer value"
        raise InvalidURLError(f"{_shown(redact_urls(url))} is not a usable URL: {_reason(exc, url)}") from None
    problem = None
    if parts.scheme not in ("http", "https"):
        problem = "only http:// and https:// URLs are supported"
    elif not parts.hostname:
        problem = "it names no host"
    elif port == 0:
        problem = "port 0 is out of range (1-65535)"
    elif " " in parts.netloc or not parts.netloc.isascii():
        problem = "its host holds a space or a non-ASCII character (give an international name in its xn-- form)"
    if problem is not None:
        raise InvalidURLError(f"{_shown(redact_urls(url))} is not a usable URL: {problem}")
    if url.isascii() and " " not in url:
        return url
    safe = "/%!$&'()*+,;=:@~-._?[]"
    path = urllib.parse.quote(parts.path, safe=safe, errors="surrogateescape")  # a server's undecodable bytes: as they came
    query = urllib.parse.quote(parts.query, safe=safe, errors="surrogateescape")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, query, parts.fragment))


def _reason(exc: ValueError, url: str) -> str:
    text = str(exc)
    if text.startswith("Port out of range"):
        port = urllib.parse.urlsplit(url).netloc.rpartition(":")[2]
        return f"port {port[:20]} is out of range (1-65535)"
    if text.startswith("Port could not be cast"):
        return "its port is not a number"
    if "IPv6" in text:
        return "its IPv6 address is not closed by ']'"
    return text


def resolve_location(url: str, location: str, status: int) -> str:
    """The URL a redirect from ``url`` points to (``location`` may be relative), checked: MalformedResponseError when it is
    not a usable URL, HTTPStatusError when it is not http(s)."""
    shown = _shown(redact_urls(location) if "://" in location else location.partition("?")[0] + ("?***" if "?" in location else ""))
    if _URL_CONTROL.search(location.replace(" ", "")):  # before urljoin, which drops CR, LF and tab without a word
        raise MalformedResponseError(f"{url} redirected ({status}) to {shown}, which holds a control character")
    scheme = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*):", location)
    if scheme is not None and scheme.group(1).lower() not in ("http", "https"):
        raise HTTPStatusError(f"{url} redirected to {shown}, not an http(s) URL", status=status)
    try:
        target = urllib.parse.urljoin(url, location)
    except ValueError:  # a malformed absolute URL: check_url says what is wrong with it
        target = location
    try:
        return check_url(target)
    except InvalidURLError as exc:
        raise MalformedResponseError(f"{url} redirected ({status}) to {exc}") from None


def _shown(value: str, limit: int = 120) -> str:
    """A URL or a server's header value for a message: quoted, and cut short (a hostile one may be 60 KiB)."""
    return repr(value[:limit] + ("..." if len(value) > limit else ""))


@dataclasses.dataclass(frozen=True, slots=True)
class ResponseFields:
    """What a response says that the client relies on or sends back, each checked against its syntax: one place for
    both HTTP paths. A malformed ETag is treated as absent (never sent back in If-Range or If-None-Match, and never
    compared), a malformed Retry-After too; a malformed framing number is an error."""

    content_length: int | None
    content_range: tuple[int, int, int | None] | None  # (first, last, total or None for "*"); None when absent
    etag: str | None


def read_response_fields(url: str, status: int, get: Callable[[str], str | None]) -> ResponseFields:
    """The checked fields of a response whose header values ``get(name)`` returns (None when absent).

    Raises:
        MalformedResponseError: a Content-Length that is not a byte count, or on a 206 a Content-Range that is not a
            byte range (an absent one is the caller's to judge).
    """
    length_text = get("Content-Length")
    length = parse_decimal(length_text)
    if length_text is not None and length is None:
        raise MalformedResponseError(f"{url} answered with Content-Length {_shown(length_text)}, not a byte count")
    range_text = get("Content-Range")
    content_range = parse_content_range(range_text)
    if status == 206 and range_text is not None and content_range is None:
        raise MalformedResponseError(f"{url} sent 206 with Content-Range {_shown(range_text or '')}, not 'bytes FIRST-LAST/SIZE'")
    etag_text = get("ETag")
    etag = parse_etag(etag_text)
    if etag_text is not None and etag is None:
        logger.info("%s: ignoring a malformed ETag %s", redact_urls(url), _shown(etag_text))
    return ResponseFields(length, content_range, etag)


def parse_decimal(value: str | None) -> int | None:
    """A byte count or offset a response gives: 1 to 19 ASCII digits (surrounding blanks allowed), else None."""
    if value is None or not _DECIMAL.fullmatch(value := value.strip(" \t")):
        return None
    return int(value)


def parse_etag(value: str | None) -> str | None:
    """An entity-tag (RFC 9110 section 8.8.3: ``"opaque"`` or ``W/"opaque"``, printable ASCII but '"'), else None."""
    if value is None or not _ETAG.fullmatch(value := value.strip(" \t")):
        return None
    return value


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
    match = _CONTENT_RANGE.fullmatch((value or "").strip(" \t"))
    if not match:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


def parse_retry_after(value: str | None) -> float | None:
    """RFC 9110 section 10.2.3: delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    seconds = parse_decimal(value)
    if seconds is not None:
        return float(seconds)
    import email.utils  # ~2 ms, paid by the rare Retry-After that is a date, not by every start

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
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
            attempts = "1 failed attempt" if self.failures == 1 else f"{self.failures} failed attempts in a row"
            raise FetchError(f"gave up {self.what} after {attempts}: {exc}{hint}") from None
        delay = self.policy.delay_s(max(1, self.failures), exc.retry_after_s if isinstance(exc, RetryableError) else None)
        count = f"failure {self.failures} of {self.policy.max_attempts}" if self.failures else "after progress: the count starts again"
        logger.warning("%s (%s); retrying in %.1f s", exc, count, delay)
        await asyncio.sleep(delay)
