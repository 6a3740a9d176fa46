"""Fetch bytes of a model over HTTP: ranged GETs, status semantics, retry with backoff.

One ``HttpOrigin`` per model URL. ``open_range`` returns a response whose body
starts at the requested offset, or says plainly that the server sent the whole
file instead (a server that ignores Range answers 200: huggingface_hub's rule,
"a 200 answer to a ranged request means truncate and restart").
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import enum
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp

from .errors import FetchError, HTTPStatusError, StalledError

logger = logging.getLogger(__name__)

T = TypeVar("T")

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

    def delay_s(self, failures: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s)
        backoff = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, failures - 1))
        return backoff * (0.5 + random.random() / 2)


class BodyKind(enum.Enum):
    PARTIAL = "partial"  # 206: the body starts at the requested offset
    WHOLE = "whole"  # 200: the body is the whole file (Range ignored or not asked)


@dataclasses.dataclass(slots=True)
class RangeResponse:
    response: aiohttp.ClientResponse
    kind: BodyKind
    start: int  # file offset of the body's first byte
    total_size_bytes: int | None
    etag: str | None


class BodyReader:
    """Reads a response body into caller-owned buffers without aiohttp's slice-and-join copies."""

    def __init__(self, response: aiohttp.ClientResponse, url: str) -> None:
        self.response = response
        self.url = url
        self._carry = memoryview(b"")  # received bytes past the last filled target

    async def read_into(self, target: memoryview) -> None:
        filled = 0
        size = target.nbytes
        if self._carry.nbytes:
            take = min(self._carry.nbytes, size)
            target[:take] = self._carry[:take]
            self._carry = self._carry[take:]
            filled = take
        while filled < size:
            block, _ = await self.response.content.readchunk()  # one received block, not joined (readany copies)
            if not block:
                raise RetryableError(f"{self.url}: body ended {size - filled} bytes early")
            take = min(len(block), size - filled)
            target[filled : filled + take] = memoryview(block)[:take]
            filled += take
            if take < len(block):
                self._carry = memoryview(block)[take:]


class RetryableError(FetchError):
    """A failure worth retrying, with the server's Retry-After if it sent one."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


def _total_from_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None
    first, last, total = match.groups()
    return int(first), int(last), None if total == "*" else int(total)


class HttpOrigin:
    """A model URL on any HTTP server (the bundled one, nginx, S3, a CDN)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, policy: RetryPolicy) -> None:
        self.session = session
        self.url = url
        self.policy = policy
        self.etag: str | None = None  # pinned after the first response, sent as If-Range
        self.bytes_received = 0

    async def open_range(self, start: int, end: int | None = None) -> RangeResponse:
        """GET bytes [start, end) (end None: to the end of the file). One attempt; raises RetryableError or FetchError."""
        headers = {"Accept-Encoding": "identity"}
        if start > 0 or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
            if self.etag and not self.etag.startswith("W/"):
                headers["If-Range"] = self.etag  # if the file changed, get all of the new one, not a mix
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.policy.connect_timeout_s, sock_read=self.policy.stall_timeout_s)
        try:
            response = await self.session.get(self.url, headers=headers, timeout=timeout)
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"cannot reach {self.url}: {exc}") from None
        except asyncio.TimeoutError:
            raise RetryableError(f"{self.url} did not answer within {self.policy.stall_timeout_s:.0f} s") from None
        status = response.status
        if status in RETRYABLE_STATUSES:
            response.release()
            raise RetryableError(f"{self.url} answered {status} {response.reason}", parse_retry_after(response.headers.get("Retry-After")))
        if status == 404:
            response.release()
            raise HTTPStatusError(f"no model at {self.url} (404); check the URL", status=status)
        if status == 416:
            response.release()
            raise HTTPStatusError(f"{self.url} refused range {start}-{end} (416): the file on the server is shorter than its manifest says", status=status)
        if status not in (200, 206):
            response.release()
            raise HTTPStatusError(f"{self.url} answered {status} {response.reason}", status=status)
        etag = response.headers.get("ETag")
        if self.etag is None:
            self.etag = etag
        if status == 206:
            parsed = _total_from_content_range(response.headers.get("Content-Range"))
            if parsed is None or parsed[0] != start:
                response.release()
                raise HTTPStatusError(f"{self.url} sent 206 with Content-Range {response.headers.get('Content-Range')!r} for a request from {start}", status=status)
            return RangeResponse(response, BodyKind.PARTIAL, start, parsed[2], etag)
        length = response.headers.get("Content-Length")
        return RangeResponse(response, BodyKind.WHOLE, 0, int(length) if length and length.isdigit() else None, etag)

    async def read_exactly(self, response: aiohttp.ClientResponse, size_bytes: int) -> bytes:
        """The next size_bytes of a body; a short or broken body, or a stall, is a RetryableError."""
        try:
            data = await response.content.readexactly(size_bytes)
        except asyncio.IncompleteReadError as exc:
            raise RetryableError(f"{self.url}: body ended {size_bytes - len(exc.partial)} bytes early") from None
        except asyncio.TimeoutError:
            raise StalledError(f"{self.url}: no data for {self.policy.stall_timeout_s:.0f} s; the connection stalled") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"{self.url}: connection broke mid-body ({exc})") from None
        self.bytes_received += size_bytes
        return data

    async def read_into(self, body: BodyReader, target: memoryview) -> None:
        """Fill ``target`` from the body (one copy, from the received block into target)."""
        try:
            await body.read_into(target)
        except asyncio.TimeoutError:
            raise StalledError(f"{self.url}: no data for {self.policy.stall_timeout_s:.0f} s; the connection stalled") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"{self.url}: connection broke mid-body ({exc})") from None
        self.bytes_received += target.nbytes

    async def with_retries(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run one-shot ``attempt`` until it succeeds, retrying RetryableError/StalledError with backoff."""
        failures = 0
        while True:
            try:
                return await attempt()
            except (RetryableError, StalledError) as exc:
                failures += 1
                if failures >= self.policy.max_attempts:
                    raise FetchError(f"gave up {what} after {failures} attempts: {exc}") from None
                delay = self.policy.delay_s(failures, getattr(exc, "retry_after_s", None))
                logger.warning("%s (attempt %d of %d); retrying in %.1f s", exc, failures, self.policy.max_attempts, delay)
                await asyncio.sleep(delay)
