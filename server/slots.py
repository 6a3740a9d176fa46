"""Request slots, and taking them back from clients that stopped reading or hold more than their share.

The server answers at most ``capacity`` requests at once, one slot each. A client that sends a GET and
then reads nothing keeps its slot while the body's write is blocked (the kernel's buffers are full and
nothing moves). Three hundred such clients that reconnect whenever they are dropped would hold every slot
for ``write_timeout_s`` at a time and starve everyone else. The first rule is about progress, as nginx's
send_timeout is, and it tightens only when it matters:

- A body is written in pieces; while a piece waits for room in the kernel's send buffer the transfer
  is *blocked*. Piece sizes adapt so that a piece takes about PIECE_TARGET_S at the client's pace.
- A transfer's *progress* is the last time it moved bytes: a piece completed, or (on Linux) the peer
  acknowledged more bytes (TCP_INFO's tcpi_bytes_acked, sampled at each piece's start, at its
  deadline, and every RECLAIM_CHECK_S while requests wait). A phone reading steadily at 1 Mbit/s
  makes progress every few tens of milliseconds however large its piece or the kernel's buffers; a
  client that reads nothing makes none once its window closes. Elsewhere only completed pieces count,
  which the adaptive piece size keeps short for a client that reads.
- While every slot is taken and requests wait, each waiting request takes back one slot: from the
  blocked transfer whose progress is oldest, provided that is at least ``stall_reclaim_s`` ago
  (default 1 s). That connection is reset; a real client resumes later with a Range request.
- Otherwise (a free slot, or nobody waiting) a blocked client keeps its slot until it has made no
  progress for ``write_timeout_s`` (default 30 s, like nginx's send_timeout): a slow client on a quiet
  server is never hurried.
- Clients that read slowly but steadily (300 connections reading 8 KiB every 0.25 s) make progress and would
  keep every slot. So, while requests wait and no transfer is stalled, a waiting request whose peer address
  holds at least two slots fewer than the address holding the most takes one of that address's slots (the one
  held longest): one client cannot keep others out. Clients that share an address (loopback, a NAT) are told
  apart by nothing, so a request that has waited ``share_after_s`` (half the queue timeout) takes the slot held
  longest (held at least that long), whatever its address: they take turns.
- A freed slot goes to the waiting request whose address holds the fewest slots, the longest waiting first;
  one that waits ``queue_timeout_s`` gets 503. An evicted client resumes with a Range request.

What a non-reader still costs: a slot for at least ``stall_reclaim_s`` per connection it opens, and the
bytes the kernel accepted before its window closed. When non-readers that reconnect at once hold every
slot, their slots fall due together, so a new request waits at most about ``stall_reclaim_s`` plus the
time to turn the slots over.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import AsyncIterator

logger = logging.getLogger(__name__)

PIECE_MIN_BYTES = 16 << 10  # 0.13 s at 1 Mbit/s: a phone's piece completes well inside stall_reclaim_s
PIECE_START_BYTES = 256 << 10
PIECE_MAX_BYTES = 8 << 20  # loopback readers: few, large sendfile calls
PIECE_TARGET_S = 0.1  # pieces that finish much faster double, slower ones halve
RECLAIM_CHECK_S = 0.1  # while requests wait, how often to look for transfers that have become stalled
TCP_INFO_BYTES_ACKED = struct.Struct("<Q")  # struct tcp_info's tcpi_bytes_acked (Linux >= 4.1)
TCP_INFO_BYTES_ACKED_OFFSET = 120


def client_key(address: str | None) -> str | None:
    """What slots and connections are shared by: the peer's IPv4 address, or the /64 of its IPv6 address (one host is
    given a /64: it could take a new address per connection within it)."""
    if address is None or ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


def read_bytes_acked(sock: socket.socket) -> int | None:
    """How many bytes the peer has acknowledged on this connection, where the kernel says (Linux); else None."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    if len(info) < TCP_INFO_BYTES_ACKED_OFFSET + TCP_INFO_BYTES_ACKED.size:
        return None
    return int(TCP_INFO_BYTES_ACKED.unpack_from(info, TCP_INFO_BYTES_ACKED_OFFSET)[0])


class Transfer:
    """One request's hold on a slot: when its current piece was handed over, and how to cut it short."""

    __slots__ = (
        "_deadline",
        "_watchdog",
        "_write_timeout_s",
        "address",
        "blocked_since",
        "bytes_acked",
        "bytes_sent",
        "evicted",
        "granted_at",
        "piece_bytes",
        "progress_at",
        "sock",
    )

    def __init__(self, write_timeout_s: float, sock: socket.socket | None = None, address: str | None = None) -> None:
        self.address = client_key(address)  # slots are shared fairly between these (an IPv4 address, an IPv6 /64)
        self.granted_at = 0.0  # loop time the slot was granted
        self.piece_bytes = PIECE_START_BYTES
        self.bytes_sent = 0
        self.blocked_since: float | None = None  # loop time the current piece started; None between pieces
        self.progress_at = asyncio.get_running_loop().time()  # last time bytes moved (or the slot was granted)
        self.sock = sock
        self.bytes_acked: int | None = None  # the peer's acknowledged bytes at the last sample
        self.evicted = False
        self._deadline: asyncio.Timeout | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._write_timeout_s = write_timeout_s

    @contextlib.asynccontextmanager
    async def writing(self, size_bytes: int) -> AsyncIterator[None]:
        """Write one piece of ``size_bytes`` inside; TimeoutError once nothing has moved for write_timeout_s
        (as nginx's send_timeout: a slow reader of a large piece is not cut off), or at once when evicted."""
        if self.evicted:
            raise TimeoutError
        loop = asyncio.get_running_loop()
        started = self.blocked_since = self.progress_at = loop.time()
        self.sample_progress(started)  # the baseline of acknowledged bytes
        try:
            async with asyncio.timeout(None) as deadline:
                self._deadline = deadline
                self._watchdog = loop.call_at(started + self._write_timeout_s, self._watch)
                yield
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            self._deadline = None
            self.blocked_since = None
        self.bytes_sent += size_bytes
        self.progress_at = loop.time()
        elapsed_s = self.progress_at - started
        if elapsed_s < PIECE_TARGET_S / 4 and size_bytes >= self.piece_bytes:
            self.piece_bytes = min(PIECE_MAX_BYTES, self.piece_bytes * 2)
        elif elapsed_s > PIECE_TARGET_S:
            self.piece_bytes = max(PIECE_MIN_BYTES, self.piece_bytes // 2)

    def _watch(self) -> None:
        """At the blocked piece's deadline: end it if nothing moved for write_timeout_s, else look again later."""
        if self._deadline is None:
            return
        now = asyncio.get_running_loop().time()
        self.sample_progress(now)
        if now - self.progress_at >= self._write_timeout_s * 0.999:
            self._deadline.reschedule(now)
        else:
            self._watchdog = asyncio.get_running_loop().call_at(self.progress_at + self._write_timeout_s, self._watch)

    def sample_progress(self, now: float) -> None:
        """Count bytes the peer acknowledged since the last sample as progress."""
        acked = read_bytes_acked(self.sock) if self.sock is not None else None
        if acked is not None and acked != self.bytes_acked:
            self.progress_at = now
            self.bytes_acked = acked

    def evict(self) -> None:
        """End the blocked piece now (its ``writing`` raises TimeoutError) and refuse further pieces."""
        self.evicted = True
        if self._deadline is not None:
            self._deadline.reschedule(asyncio.get_running_loop().time())


class SlotPool:
    """At most ``capacity`` transfers at once; waiting requests take back slots from stalled ones, and from
    addresses holding more than their share (module doc)."""

    def __init__(self, capacity: int, stall_reclaim_s: float, share_after_s: float = 5.0) -> None:
        self.capacity = capacity
        self.stall_reclaim_s = stall_reclaim_s
        self.share_after_s = share_after_s
        self.evictions = 0
        self.share_evictions = 0  # of which, for a waiting request of another address or one waiting long
        self._holders: set[Transfer] = set()
        self._held_by: collections.Counter[str | None] = collections.Counter()  # slots per address
        self._waiters: collections.deque[tuple[asyncio.Future[None], Transfer, float]] = collections.deque()
        self._evicting = 0  # evicted transfers that have not released their slot yet
        self._timer: asyncio.TimerHandle | None = None

    async def acquire(self, transfer: Transfer, timeout_s: float) -> None:
        """Hold a slot for ``transfer``; TimeoutError if none comes within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        if len(self._holders) < self.capacity and not self._waiters:
            self._grant(transfer, loop.time())
            return
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (waiter, transfer, loop.time())
        self._waiters.append(entry)
        self._reclaim()
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(transfer)  # handed a slot just as we gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
            raise

    def release(self, transfer: Transfer) -> None:
        """Give the slot back; the waiting request whose address holds the fewest slots gets it (the longest waiting
        first)."""
        if transfer in self._holders:
            self._holders.discard(transfer)
            self._held_by[transfer.address] -= 1
            if not self._held_by[transfer.address]:
                del self._held_by[transfer.address]
            if transfer.evicted:
                self._evicting -= 1
        now = asyncio.get_running_loop().time()
        while self._waiters and len(self._holders) < self.capacity:
            entry = min(self._waiters, key=lambda e: self._held_by[e[1].address])  # min() keeps the first of equals
            self._waiters.remove(entry)
            waiter, waiting, _ = entry
            if not waiter.done():
                self._grant(waiting, now)
                waiter.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _grant(self, transfer: Transfer, now: float) -> None:
        transfer.progress_at = transfer.granted_at = now
        self._holders.add(transfer)
        self._held_by[transfer.address] += 1

    def _evict(self, transfer: Transfer) -> None:
        transfer.evict()
        self._evicting += 1
        self.evictions += 1

    def _reclaim(self) -> None:
        """For each waiting request not yet provided for, evict: the transfer blocked longest (past stall_reclaim_s);
        else one of the address holding the most slots, for a request of an address holding two fewer; else, for a
        request waiting share_after_s, the transfer holding its slot longest (at least as long)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        needed = len(self._waiters) - self._evicting - (self.capacity - len(self._holders))
        if needed > 0:
            now = asyncio.get_running_loop().time()
            due = now - self.stall_reclaim_s
            for transfer in self._holders:
                if transfer.blocked_since is not None:
                    transfer.sample_progress(now)
            stalled = sorted(
                (t for t in self._holders if not t.evicted and t.blocked_since is not None and t.progress_at <= due),
                key=lambda t: t.progress_at,
            )
            for transfer in stalled[:needed]:
                self._evict(transfer)
            if stalled:
                logger.debug(
                    "%d requests waiting for a slot; reclaimed %d slots from blocked clients without progress for %.1f s",
                    len(self._waiters),
                    min(needed, len(stalled)),
                    self.stall_reclaim_s,
                )
            needed -= min(needed, len(stalled))
            if needed > 0:
                self._share(needed, now)
        if self._waiters:
            self._timer = asyncio.get_running_loop().call_later(RECLAIM_CHECK_S, self._reclaim)

    def _share(self, needed: int, now: float) -> None:
        """Evict up to ``needed`` transfers for waiting requests that hold less than their share (see _reclaim)."""
        live = [t for t in self._holders if not t.evicted]
        held = collections.Counter(t.address for t in live)
        by_address: dict[str | None, list[Transfer]] = collections.defaultdict(list)
        for transfer in sorted(live, key=lambda t: t.granted_at):
            by_address[transfer.address].append(transfer)
        oldest = sorted(live, key=lambda t: t.granted_at)
        waiting = sorted(self._waiters, key=lambda e: (held[e[1].address], e[2]))
        for _, transfer, since in waiting:
            if needed <= 0:
                break
            victim = None
            busiest = max(held, key=held.__getitem__, default=None)
            if busiest is not None and held[busiest] - held[transfer.address] >= 2:
                victim = next((t for t in by_address[busiest] if not t.evicted), None)
            elif now - since >= self.share_after_s:
                victim = next((t for t in oldest if not t.evicted and now - t.granted_at >= self.share_after_s), None)
            if victim is None:
                continue
            self._evict(victim)
            self.share_evictions += 1
            held[victim.address] -= 1
            held[transfer.address] += 1  # the slot is this request's, as release() hands it out
            needed -= 1
            logger.info(
                "a request from %s waited; took a slot from %s, held for %.1f s",
                transfer.address,
                victim.address,
                now - victim.granted_at,
            )
