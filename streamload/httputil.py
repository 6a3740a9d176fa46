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

from .errors import FetchError, HTTPStatusError, RetryableError, StalledError, UsageError

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


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


def range_headers(start: int, end: int | None, etag: str | None) -> dict[str, str]:
    """Request headers for bytes [start, end) (end None: to the end of the file).

    ``bytes=0-`` is sent too: a 206 to it says the server honours Range, a 200 that it does not.

    If-Range carries a strong ETag only (RFC 9110 section 13.1.5): if the file changed,
    the server sends all of the new one instead of a mix of old and new.
    """
    headers = {"Accept-Encoding": "identity"}
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
            raise FetchError(f"gave up {self.what} after {self.failures} failed attempts in a row: {exc}") from None
        delay = self.policy.delay_s(max(1, self.failures), getattr(exc, "retry_after_s", None))
        logger.warning("%s (failure %d of %d); retrying in %.1f s", exc, self.failures, self.policy.max_attempts, delay)
        await asyncio.sleep(delay)
