"""Read a model's header (preamble + manifest) from any source, and validate it off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

from .errors import FetchError, RetryableError, StalledError
from .formats import Manifest
from .formats.constants import PREAMBLE_SIZE_BYTES
from .formats.reader import header_size_needed, read_header
from .httputil import Backoff, RetryPolicy
from .transport import Source, SpanReader

HEADER_PROBE_BYTES = 64 << 10  # a header-only request: preamble and, usually, the whole manifest


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """Preamble + manifest of a model, however they were obtained."""

    data_offset: int
    manifest: Manifest
    raw: bytes  # the bytes as stored, for the cache
    stream: SpanReader | None = dataclasses.field(default=None, compare=False)  # the body going on into the data, when asked for


async def parse_header(raw: bytes, file_size_bytes: int | None) -> Header:
    """Validate preamble and manifest off the event loop: the work is linear in the chunk count (~100k for 100 GB)."""
    preamble, manifest = await asyncio.to_thread(read_header, raw, file_size_bytes)
    return Header(preamble.data_offset, manifest, raw)


async def fetch_header(source: Source, *, stream: bool = False) -> Header:
    """Preamble and manifest with one request (two when the manifest is over 64 KiB). One attempt.

    ``stream=True``: one open-ended request from byte 0, left open after the manifest in
    ``Header.stream`` so the data follows on the same connection (no round trip between
    manifest and data); the caller closes it.
    """
    if stream:
        return await _fetch_header_stream(source)
    reader = await source.open_span(0, HEADER_PROBE_BYTES)
    try:
        total = reader.total_size_bytes
        if total is None:
            raise FetchError(f"{source.url} did not say how large the file is (no Content-Length or Content-Range)")
        first = bytearray(min(PREAMBLE_SIZE_BYTES, total))
        await asyncio.to_thread(reader.read_into, 0, memoryview(first))
        needed = header_size_needed(first)
        available = min(needed, total) if reader.whole_file else min(needed, HEADER_PROBE_BYTES, total)
        raw = first + bytearray(available - len(first))
        await asyncio.to_thread(reader.read_into, len(first), memoryview(raw)[len(first) :])
    finally:
        reader.close()
    if len(raw) < needed <= total:
        more = await source.open_span(len(raw), needed)
        try:
            if more.whole_file:
                raise FetchError(f"{source.url} answered a range request with the whole file after honouring one")
            rest = bytearray(needed - len(raw))
            await asyncio.to_thread(more.read_into, len(raw), memoryview(rest))
            raw = raw + rest  # a new buffer: the executor may not yet have dropped its view of raw (resizing it would raise BufferError)
        finally:
            more.close()
    return await parse_header(bytes(raw), total)


async def _fetch_header_stream(source: Source) -> Header:
    reader = await source.open_span(0, None)
    try:
        total = reader.total_size_bytes
        if total is None:
            raise FetchError(f"{source.url} did not say how large the file is (no Content-Length or Content-Range)")
        first = bytearray(min(PREAMBLE_SIZE_BYTES, total))
        await asyncio.to_thread(reader.read_into, 0, memoryview(first))
        raw = first + bytearray(max(0, min(header_size_needed(first), total) - len(first)))
        await asyncio.to_thread(reader.read_into, len(first), memoryview(raw)[len(first) :])
        header = await parse_header(bytes(raw), total)
    except BaseException:
        reader.close()
        raise
    return dataclasses.replace(header, stream=reader)


async def fetch_header_with_retries(
    source: Source,
    policy: RetryPolicy,
    *,
    give_up: Callable[[RetryableError | StalledError], Awaitable[bool]] | None = None,
    stream: bool = False,
) -> Header:
    """``fetch_header`` retried with backoff; ``give_up(failure)`` returning True ends the retries at once (FetchError)."""
    backoff = Backoff(policy, f"fetching the header of {source.url}")
    while True:
        try:
            return await fetch_header(source, stream=stream)
        except (RetryableError, StalledError) as exc:
            if give_up is not None and await give_up(exc):
                raise FetchError(str(exc)) from None
            await backoff.wait(exc)
