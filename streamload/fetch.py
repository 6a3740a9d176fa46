"""Fetch bytes of a model over HTTP: ranged GETs, status semantics, retry with backoff.

One ``HttpOrigin`` per model URL. ``open_range`` returns a response whose body
starts at the requested offset, or says plainly that the server sent the whole
file instead (a server that ignores Range answers 200: huggingface_hub's rule,
"a 200 answer to a ranged request means truncate and restart").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import enum
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import aiohttp

from .errors import FetchError, HTTPStatusError, RetryableError, StalledError
from .formats import Manifest
from .formats.constants import PREAMBLE_SIZE_BYTES
from .formats.reader import header_size_needed, read_header

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
    """The error for an unusable status, on either HTTP path: retryable ones carry the server's Retry-After."""
    if status in RETRYABLE_STATUSES:
        return RetryableError(f"{url} answered {status} {reason}".rstrip(), parse_retry_after(retry_after))
    if status == 404:
        return HTTPStatusError(f"no model at {url} (404); check the URL", status=status)
    return HTTPStatusError(f"{url} answered {status} {reason}".rstrip(), status=status)


@contextlib.contextmanager
def body_errors(url: str, policy: RetryPolicy) -> Iterator[None]:
    """How a failing body read surfaces, whichever client read it: a stall, or a retryable break."""
    try:
        yield
    except asyncio.IncompleteReadError as exc:
        raise RetryableError(f"{url}: body ended {exc.expected - len(exc.partial)} bytes early") from None
    except TimeoutError:  # before ClientError: aiohttp's read timeouts are both
        raise StalledError(f"{url}: no data for {policy.stall_timeout_s:.0f} s; the connection stalled") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise RetryableError(f"{url}: connection broke mid-body ({exc})") from None


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
        if status == 416:
            response.release()
            raise HTTPStatusError(f"{self.url} refused range {start}-{end} (416): the file on the server is shorter than its manifest says", status=status)
        if status not in (200, 206):
            response.release()
            raise http_status_error(self.url, status, response.reason or "", response.headers.get("Retry-After"))
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
        """The next size_bytes of a body; a short or broken body is a RetryableError, a stall a StalledError."""
        with body_errors(self.url, self.policy):
            return await response.content.readexactly(size_bytes)

    async def read_into(self, body: BodyReader, target: memoryview) -> None:
        """Fill ``target`` from the body (one copy, from the received block into target)."""
        with body_errors(self.url, self.policy):
            await body.read_into(target)

    async def with_retries(self, attempt: Callable[[], Awaitable[T]], what: str) -> T:
        """Run one-shot ``attempt`` until it succeeds, retrying RetryableError/StalledError with backoff."""
        backoff = Backoff(self.policy, what)
        while True:
            try:
                return await attempt()
            except (RetryableError, StalledError) as exc:
                await backoff.wait(exc)


HEADER_PROBE_BYTES = 64 << 10  # first request: preamble and, usually, the whole manifest


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """Preamble + manifest of a model, however they were obtained."""

    data_offset: int
    manifest: Manifest
    raw: bytes  # the bytes as stored, for the cache
    ranges_honoured: bool  # False: the server answered the ranged probe with the whole file


async def parse_header(raw: bytes, file_size_bytes: int | None, *, ranges_honoured: bool = True) -> Header:
    """Validate preamble and manifest off the event loop: the work is linear in the chunk count (~100k for 100 GB)."""
    preamble, manifest = await asyncio.to_thread(read_header, raw, file_size_bytes)
    return Header(preamble.data_offset, manifest, raw, ranges_honoured)


async def fetch_header(origin: HttpOrigin) -> Header:
    """Read preamble and manifest with one ranged request (two when the manifest is over 64 KiB). One attempt."""
    reply = await origin.open_range(0, HEADER_PROBE_BYTES)
    try:
        total = reply.total_size_bytes
        if total is None:
            raise FetchError(f"{origin.url} did not say how large the file is (no Content-Length or Content-Range)")
        first = await origin.read_exactly(reply.response, min(PREAMBLE_SIZE_BYTES, total))
        needed = header_size_needed(first)
        available = min(needed, total) if reply.kind is BodyKind.WHOLE else min(needed, HEADER_PROBE_BYTES, total)
        raw = first + await origin.read_exactly(reply.response, available - len(first))
    finally:
        reply.response.close()
    if len(raw) < needed <= total:
        more = await origin.open_range(len(raw), needed)
        try:
            if more.kind is not BodyKind.PARTIAL:
                raise FetchError(f"{origin.url} answered a range request with the whole file after honouring one")
            raw += await origin.read_exactly(more.response, needed - len(raw))
        finally:
            more.response.close()
    return await parse_header(raw, total, ranges_honoured=reply.kind is BodyKind.PARTIAL)
