"""The sources of one download: the primary URL or file, then each mirror; probed, counted, judged, dropped.

A mirror is used once its header probe shows the model's manifest digest and data offset (``probe``). A source
that fails for good, ignores Range while another honours it, or keeps serving chunks that fail their hash is
dropped (``drop``): its running spans end at their next chunk boundary. Which chunks each source served corrupt is
kept here, so such a chunk goes to another source while one is left. The scheduler is the download's: what a drop
frees is the download's to hand out again. Event-loop only; no per-chunk work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..errors import ChunkIntegrityError, FetchError, FormatError, StreamloadError, redact_urls
from ..formats import ChunkEntry
from ..stats import DownloadStats
from ..transport.source import Source
from .hosts import MAX_BAD_CHUNKS, Host, HostState
from .probes import HeaderProbes, header_mismatch

logger = logging.getLogger(__name__)

MAX_INTEGRITY_ATTEMPTS = 3  # fetches of one chunk that fail their hash before giving up


class Sources:
    """Every host of one model's download (the primary's first) and what each did wrong."""

    def __init__(self, url: str, mirror_urls: list[str], probes: HeaderProbes, stats: DownloadStats) -> None:
        self.url = url
        self.mirror_urls = mirror_urls
        self.probes = probes
        self.stats = stats
        self.primary: Source | None = None  # the primary's (the origin closes it)
        self.hosts: list[Host] = []  # the primary URL's, then each mirror's (made when the download starts)
        self._integrity_attempts: dict[int, int] = {}

    def open(self, primary: Source) -> None:
        """The primary first: its header is the model's; the others are probed against it (once)."""
        if not self.hosts:
            self.primary = primary
            self.hosts = [Host(self.url, primary, HostState.LIVE)] + [Host(url) for url in self.mirror_urls]

    def first_live(self) -> Host | None:
        return next((m for m in self.hosts if m.state is HostState.LIVE), None)

    async def probe(self, host: Host, digest: str, data_offset: int) -> bool:
        """Check a mirror's header against the model's; True when it serves the same model.
        Otherwise it is dropped, named in the log."""
        source, task = self.probes.take(host.url)
        try:
            header = await task
            problem = header_mismatch(header, digest, data_offset)
        except (FetchError, FormatError) as exc:
            header, problem = None, f"its header cannot be read ({exc})"
        except asyncio.CancelledError:  # the download ended first: the probe goes with it (a restart probes again)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StreamloadError):
                await task
            await source.close()
            raise
        if problem is not None or header is None:
            await source.close()
            self.drop(host, problem or "no header", digest)
            return False
        host.source, host.state = source, HostState.LIVE
        self.count_bytes(host, len(header.raw))
        logger.info("mirror %s serves the same model %s: it takes a share of the download", redact_urls(host.url), digest[:12])
        return True

    def ignores_range(self, host: Host) -> bool:
        """True when it answers with the whole file while another live source honours Range: it could only read the
        model from byte 0, alone."""
        assert host.source is not None
        return host.source.whole_file_only and any(m is not host and m.state is HostState.LIVE for m in self.hosts)

    def drop(self, host: Host, reason: str, digest: str) -> None:
        """Use this source no more: its running spans end at their next chunk boundary and give the rest back.

        Raises FetchError when no source is left (none live, none being probed).
        """
        if host.state is HostState.DROPPED:
            return
        host.state, host.reason = HostState.DROPPED, reason
        for span in host.spans:
            span.stop()
        if not any(m.usable for m in self.hosts):
            sources = "; ".join(f"{m.url}: {m.reason}" for m in self.hosts)
            raise FetchError(f"every source of {digest[:12]} failed ({sources}); connect and run again")
        logger.warning("%s: %s; the other sources take its share", redact_urls(host.url), reason)

    def count_bytes(self, host: Host, size_bytes: int) -> None:
        self.stats.bytes_downloaded += size_bytes
        by_source = self.stats.bytes_by_source
        by_source[host.url] = by_source.get(host.url, 0) + size_bytes

    def judge_integrity(self, chunk: ChunkEntry, exc: ChunkIntegrityError, host: Host) -> ChunkIntegrityError | None:
        """A chunk failed its hash: None when it may be fetched again (from another mirror when one is live), or (too
        many attempts with no other mirror left to try, or a local file) the error that ends the download."""
        assert host.source is not None
        self.stats.integrity_failures += 1
        attempts = self._integrity_attempts.get(chunk.index, 0) + 1
        self._integrity_attempts[chunk.index] = attempts
        host.bad_chunks[chunk.index] = chunk
        remote = host.source.remote
        untried = [m for m in self.hosts if m.usable and chunk.index not in m.bad_chunks]  # a mirror being probed counts
        if not remote or (attempts >= MAX_INTEGRITY_ATTEMPTS and not untried):
            culprits = ", ".join(m.url for m in self.hosts if chunk.index in m.bad_chunks)
            where = "the file" if not remote else f"{attempts} downloads from {culprits}"
            fatal = ChunkIntegrityError(
                f"chunk {chunk.index} of layer {chunk.layer_index} failed its sha256 check in {where}; "
                "the source is corrupt: nothing from it was used. Re-convert or re-upload the model.",
                layer_index=chunk.layer_index,
                chunk_index=chunk.index,
            )
            fatal.__cause__ = exc
            return fatal
        if untried:
            others = redact_urls(" or ".join(m.url for m in untried))
            logger.warning("%s (from %s); fetching it from %s", exc, redact_urls(host.url), others)
        else:
            logger.warning("%s; fetching it again", exc)
        return None

    def too_corrupt(self, host: Host) -> bool:
        """Whether a mirror served MAX_BAD_CHUNKS chunks that failed their hash while another is live (drop it)."""
        others = [m for m in self.hosts if m is not host and m.state is HostState.LIVE]
        return len(host.bad_chunks) >= MAX_BAD_CHUNKS and bool(others)

    async def close(self) -> None:
        """Close every mirror's source (the primary's is the origin's), once the pipeline's threads are done."""
        for host in self.hosts:
            if host.source is not None and host.source is not self.primary:
                await host.source.close()
