"""Several hosts of one model: which of them may be used, how fast each is, how large a span each takes.

A mirror is used only after a header probe (one bounded request, ``header.read_header``)
shows the manifest digest and data offset of the primary URL: across hosts the model's
identity is its manifest digest, not an ETag (nginx on two hosts gives one file two
ETags; each ``HttpSource`` pins its own). A mirror serving another model is refused
before any of its data is read, and named in the log.

Every mirror gets its own workers, each bound to that mirror's source; they take spans
from the one ``ChunkScheduler``. Each worker measures its rate (bytes of a span over the
seconds from its request to its last byte, smoothed) and sizes its next span from it:
at most ``SPAN_S`` of its own rate, and at most ``TAIL_SHARE`` of the time all workers
together still need (never under ``MIN_SPAN_S``), so a faster mirror takes larger spans
and all finish at about the same time (the spans shrink towards the end instead of one
slow span finishing alone). A worker without a measurement takes one chunk's worth first.

A mirror that stops answering (its workers give up after the retry policy's attempts)
or serves ``MAX_BAD_CHUNKS`` chunks that fail their hash is dropped: its running spans
end at their next chunk boundary and what they did not receive goes back to the
scheduler, for the others; what was verified stays. A chunk that failed its hash from
one mirror is not handed to that mirror again while another live one has not failed it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import StreamloadError, UsageError
from ..formats import ChunkEntry
from ..transport.httputil import RetryPolicy, check_url, same_origin
from ..transport.source import Source
from .header import Header, read_header_with_retries
from .origin import is_url
from .span import Span

if TYPE_CHECKING:
    import aiohttp

SPAN_S = 2.0  # a span takes about this long at its worker's rate: requests are few, and a dead mirror hands back little
MIN_SPAN_S = 0.2  # and at least this long (several round trips), however little is left: small chunks end the file
TAIL_SHARE = 0.5  # of the time left for everyone: spans halve towards the end, so the last ones finish together
MAX_SPAN_BYTES = 64 << 20
MIN_WORKERS_PER_MIRROR = 2  # while one request waits its round trip for a first byte, the other keeps the link busy
MAX_BAD_CHUNKS = 3  # chunks failing their hash from one mirror before it is dropped (while another is live)
RATE_SMOOTHING = 0.5  # weight of the newest span in a worker's rate


class MirrorState(enum.Enum):
    PROBING = "probing"  # its header is being checked against the model's
    LIVE = "live"  # same model: its workers take spans
    DROPPED = "dropped"  # refused, unreachable, failing or corrupt: used no more


@dataclasses.dataclass(eq=False)
class RateMeter:
    """One worker's measured rate (None until it has received a span, and again after a failure)."""

    rate_bytes_per_s: float | None = None

    def record(self, size_bytes: int, seconds: float) -> None:
        if size_bytes <= 0 or seconds <= 0:
            return
        rate = size_bytes / seconds
        old = self.rate_bytes_per_s
        self.rate_bytes_per_s = rate if old is None else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * old


@dataclasses.dataclass(eq=False)
class Mirror:
    """One host of the model (the primary URL is the first), its state and what its workers are doing."""

    url: str
    source: Source | None = None  # set once its header matched (the primary's from the start)
    state: MirrorState = MirrorState.PROBING
    reason: str | None = None  # why it was dropped
    meters: list[RateMeter] = dataclasses.field(default_factory=list)  # of its running workers
    spans: set[Span] = dataclasses.field(default_factory=set)  # running on it
    bad_chunks: dict[int, ChunkEntry] = dataclasses.field(default_factory=dict)  # index -> chunk it served that failed its hash

    @property
    def usable(self) -> bool:
        return self.state is not MirrorState.DROPPED


def check_mirrors(url: str, mirrors: Sequence[str]) -> list[str]:
    """The mirror URLs to use beside ``url``: http(s) only, each once, the primary left out. UsageError otherwise
    (InvalidURLError for a URL that is malformed: a port out of range, an unclosed IPv6 address)."""
    if not mirrors:
        return []
    if not is_url(url):
        raise UsageError(f"mirrors serve a model URL; {url} is a local file")
    checked: list[str] = []
    for mirror in mirrors:
        mirror = mirror.partition("#")[0]
        if not is_url(mirror):
            raise UsageError(f"a mirror is an http(s) URL of the same .slm file, got {mirror!r}")
        mirror = check_url(mirror)
        if mirror != url.partition("#")[0] and mirror not in checked:
            checked.append(mirror)
    return checked


def header_mismatch(mirror: Header, digest: str, data_offset: int) -> str | None:
    """Why a mirror's header does not describe the model being fetched (``digest``, ``data_offset``), or None."""
    if mirror.manifest.digest != digest:
        return f"it serves another model (manifest digest {mirror.manifest.digest[:12]}, not {digest[:12]}); refused"
    if mirror.data_offset != data_offset:
        return f"its file lays the model out differently (data at byte {mirror.data_offset}, not {data_offset}); refused"
    return None


def span_limit_bytes(meter: RateMeter, meters: Sequence[RateMeter], pending_bytes: int, chunk_size_bytes: int) -> int:
    """The most one worker's next span should hold: SPAN_S of its rate, and TAIL_SHARE of its share of what is left,
    but no less than MIN_SPAN_S of its rate (a span holds at least one chunk whatever the limit).

    ``meters`` are every live worker's (this one's among them). Without a measurement: one chunk's worth.
    """
    rate = meter.rate_bytes_per_s
    if rate is None:
        return chunk_size_bytes
    total = sum(m.rate_bytes_per_s for m in meters if m.rate_bytes_per_s is not None)
    remaining_s = pending_bytes / total if total > 0 else 0.0
    return int(min(MAX_SPAN_BYTES, rate * max(MIN_SPAN_S, min(SPAN_S, remaining_s * TAIL_SHARE))))


class HeaderProbes:
    """Each mirror's header, fetched beside the primary's (a bounded request; retried, but not when nobody answers),
    as tasks that the download awaits (``take``) or ``close`` cancels."""

    def __init__(
        self,
        primary_url: str,
        urls: Sequence[str],
        retry: RetryPolicy,
        session: aiohttp.ClientSession | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self.primary_url = primary_url
        self.urls = urls
        self.retry = retry
        self.session = session
        self.headers = headers
        self._probes: dict[str, tuple[Source, asyncio.Task[Header]]] = {}  # mirror URL -> its header, on the way

    def start(self) -> None:
        """Start every mirror's probe that is not on the way (none without mirrors: no HTTP module is loaded)."""
        for url in self.urls:
            if url not in self._probes:
                self._probes[url] = self._probe(url)

    def take(self, url: str) -> tuple[Source, asyncio.Task[Header]]:
        """The source and header task of one mirror, started now when none is on the way (a download that ended
        while the mirror was still being probed took and dropped the last one): the caller closes the source."""
        probe = self._probes.pop(url, None)
        return probe if probe is not None else self._probe(url)

    def _probe(self, url: str) -> tuple[Source, asyncio.Task[Header]]:
        from ..transport.http_source import HttpSource

        headers = self.headers if same_origin(url, self.primary_url) else None  # credentials stay on the primary's origin
        source = HttpSource(url, self.retry, self.session, headers)
        return source, asyncio.create_task(read_header_with_retries(source, self.retry, give_up_unreachable=True), name=f"probe {url}")

    async def close(self) -> None:
        """Cancel the probes never taken (the download did not start, or ended first) and close their sources."""
        for source, task in self._probes.values():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await task
            await source.close()
        self._probes.clear()
