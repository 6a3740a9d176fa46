"""One download's bandwidth cap (``--limit-rate``, ``limit_rate_bytes_per_s``): a token bucket shared by every
connection and mirror of the download.

Threads: ``consume`` is called by the pool threads that receive bodies, after each receive, and sleeps there until the
bytes fit the rate; a lock orders the reservations. Costs: one lock and one clock read per receive.
"""

from __future__ import annotations

import threading
import time

BURST_S = 0.1  # at most this many seconds' worth of bytes go through at once after an idle spell


class RateLimiter:
    """A token bucket of ``rate_bytes_per_s``: over any span of time, the bytes consumed stay under rate x time plus
    one burst. Receives are capped at ``receive_bytes`` so that one read cannot overshoot by much."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.receive_bytes = max(1024, int(rate_bytes_per_s * BURST_S / 2))
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the bytes reserved so far are paid for

    def consume(self, count_bytes: int) -> None:
        """Account for ``count_bytes`` received; sleep until they fit the rate."""
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now - BURST_S) + count_bytes / self.rate_bytes_per_s
            wait_s = self._free_at - now
        if wait_s > 0:
            time.sleep(wait_s)
