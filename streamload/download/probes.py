"""Which other hosts of a model may be used: the mirror URLs checked when the model is opened, and each mirror's
header read beside the primary's (``HeaderProbes``), to be compared with the model's (``header_mismatch``) before any
of its data is used. How a mirror is then paced and dropped, as a host, is ``hosts.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import StreamloadError, UsageError
from ..transport.httputil import RetryPolicy, check_url, same_origin
from ..transport.source import Source
from .header import Header, read_header_with_retries
from .origin import is_url

if TYPE_CHECKING:
    import aiohttp


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
