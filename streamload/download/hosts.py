"""The hosts of one model's download, the primary URL first and then each mirror (``HostState``: probing, live,
dropped; a dropped one stays listed, with why): how fast each is, how large a span each takes, when one is dropped.

A mirror's workers take spans only after its header probe (``probes.py``: one bounded request, ``header.read_header``) shows
the manifest digest and data offset of the primary URL: across hosts the model's identity is its manifest digest, not
an ETag (nginx on two hosts gives one file two ETags; each ``HttpSource`` pins its own). A mirror serving another
model is refused before any of its data is read, and named in the log.

Every host gets its own workers, each bound to that host's source; they take spans from the one ``ChunkScheduler``.
Each worker measures its rate (bytes of a span over the seconds from its request to its last byte, smoothed) and
sizes its next span from it: at most ``SPAN_S`` of its own rate, and at most ``TAIL_SHARE`` of the time all workers
together still need (never under ``MIN_SPAN_S``), so a faster host takes larger spans and all finish at about the
same time (the spans shrink towards the end instead of one slow span finishing alone). A worker without a
measurement takes one chunk's worth first.

A host that stops answering (its workers give up after the retry policy's attempts) or serves ``MAX_BAD_CHUNKS``
chunks that fail their hash is dropped while another is live: its running spans end at their next chunk boundary
and what they did not receive goes back to the scheduler, for the others; what was verified stays. A chunk that
failed its hash from one host is not handed to that host again while another live one has not failed it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from ..formats import ChunkEntry
from ..transport.source import Source
from .span import Span

SPAN_S = 2.0  # a span takes about this long at its worker's rate: requests are few, and a dead mirror hands back little
MIN_SPAN_S = 0.2  # and at least this long (several round trips), however little is left: small chunks end the file
TAIL_SHARE = 0.5  # of the time left for everyone: spans halve towards the end, so the last ones finish together
MAX_SPAN_BYTES = 64 << 20
MIN_WORKERS_PER_HOST = 2  # with mirrors: while one request waits its round trip for a first byte, the other keeps the link busy
MAX_BAD_CHUNKS = 3  # chunks failing their hash from one mirror before it is dropped (while another is live)
RATE_SMOOTHING = 0.5  # weight of the newest span in a worker's rate


class HostState(enum.Enum):
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
class Host:
    """One host of the model (the primary URL is the first), its state and what its workers are doing."""

    url: str
    source: Source | None = None  # set once its header matched (the primary's from the start)
    state: HostState = HostState.PROBING
    reason: str | None = None  # why it was dropped
    meters: list[RateMeter] = dataclasses.field(default_factory=list)  # of its running workers
    spans: set[Span] = dataclasses.field(default_factory=set)  # running on it
    bad_chunks: dict[int, ChunkEntry] = dataclasses.field(default_factory=dict)  # index -> chunk it served that failed its hash

    @property
    def usable(self) -> bool:
        return self.state is not HostState.DROPPED


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
