"""Read a model's header (preamble + manifest) from any source, and validate it off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses

from ..errors import FetchError, FormatError, RetryableError, StalledError, UnreachableError, located
from ..formats import Manifest
from ..formats import reader as container
from ..formats.constants import PREAMBLE_SIZE_BYTES
from ..formats.reader import header_size_needed
from ..transport.httputil import Backoff, RetryPolicy
from ..transport.source import Source, SpanReader

HEADER_PROBE_BYTES = 64 << 10  # a header-only request: preamble and, usually, the whole manifest


@dataclasses.dataclass(frozen=True, slots=True)
class Header:
    """Preamble + manifest of a model, however they were obtained."""

    data_offset: int
    manifest: Manifest
    raw: bytes | bytearray  # the bytes as stored, for the cache (as received: not to be changed)
    stream: SpanReader | None = dataclasses.field(default=None, compare=False)  # the body going on into the data, when asked for


async def parse_header(raw: bytes | bytearray, file_size_bytes: int | None) -> Header:
    """Validate preamble and manifest off the event loop: the work is linear in the chunk count (~100k for 100 GB)."""
    preamble, manifest = await asyncio.to_thread(container.read_header, raw, file_size_bytes)
    return Header(preamble.data_offset, manifest, raw)


async def read_header(source: Source, *, stream: bool = False) -> Header:
    """Preamble and manifest with one request (two when the manifest is over 64 KiB). One attempt.

    ``stream=True``: one open-ended request from byte 0, left open after the manifest in
    ``Header.stream`` so the data follows on the same connection (no round trip between
    manifest and data); the caller closes it.
    """
    try:
        return await _read_header(source, stream)
    except FormatError as exc:  # named after the source: a URL that serves a web page, say, rather than a model
        if str(exc).startswith(source.url):
            raise
        raise located(exc, source.url) from None


async def _read_header(source: Source, stream: bool) -> Header:
    if stream:
        reader = await source.open_span(0, None)
        try:
            raw, total, _ = await _read_header_bytes(source, reader, limit=None)
            header = await parse_header(raw, total)
        except BaseException:
            reader.close()
            raise
        return dataclasses.replace(header, stream=reader)
    reader = await source.open_span(0, HEADER_PROBE_BYTES)
    try:
        raw, total, needed = await _read_header_bytes(source, reader, limit=None if reader.whole_file else HEADER_PROBE_BYTES)
    finally:
        reader.close()
    if len(raw) < needed <= total:
        more = await source.open_span(len(raw), needed)
        try:
            if more.whole_file:
                raise FetchError(f"{source.url} answered a range request with the whole file after honouring one")
            rest = bytearray(needed - len(raw))
            await asyncio.to_thread(more.read_into, len(raw), memoryview(rest))
            raw = raw + rest  # a new object, whatever views of the pieces the reader still holds
        finally:
            more.close()
    return await parse_header(raw, total)


async def _read_header_bytes(source: Source, reader: SpanReader, *, limit: int | None) -> tuple[bytearray, int, int]:
    """(the header's bytes, at most ``limit`` of them; the file's size; the header's full size) from a body at byte 0."""
    total = reader.total_size_bytes
    if total is None:
        raise FetchError(f"{source.url} did not say how large the file is (no Content-Length or Content-Range)")
    first = bytearray(min(PREAMBLE_SIZE_BYTES, total))
    await asyncio.to_thread(reader.read_into, 0, memoryview(first))
    needed = header_size_needed(first)
    available = min(needed, total, limit if limit is not None else needed)
    # received in place, never copied here: a manifest of ~100k chunks is ~10 MB, and each copy into fresh pages ~5 ms
    raw = bytearray(max(available, len(first)))
    raw[: len(first)] = first
    await asyncio.to_thread(reader.read_into, len(first), memoryview(raw)[len(first) :])
    return raw, total, needed


async def read_header_with_retries(
    source: Source,
    policy: RetryPolicy,
    *,
    give_up_unreachable: bool = False,
    stream: bool = False,
) -> Header:
    """``read_header`` retried with backoff. ``give_up_unreachable``: a server nobody answers at (connection refused,
    no such host) ends the retries at once (FetchError)."""
    backoff = Backoff(policy, f"fetching the header of {source.url}")
    while True:
        try:
            return await read_header(source, stream=stream)
        except (RetryableError, StalledError) as exc:
            if give_up_unreachable and isinstance(exc, UnreachableError):
                raise  # nobody answers there: the caller may stand in a cached copy (an UnreachableError is a FetchError)
            await backoff.wait(exc)
