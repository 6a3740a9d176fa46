"""What a download moved and when: the figures a progress bar, ``fetch --json`` and the timeline read."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for progress callbacks."""

    bytes_downloaded: int  # moved over the network in this run
    bytes_to_download: int  # compressed bytes the cache lacked when the run started
    layers_ready: int
    layers_total: int
    elapsed_s: float
    bytes_cached: int = 0  # compressed bytes the cache already held: a resumed bar goes on from here out of the whole
    bytes_total: int = 0  # the file: header and data

    @property
    def rate_bytes_per_s(self) -> float:
        return self.bytes_downloaded / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclasses.dataclass(slots=True)
class DownloadStats:
    """What a run moved and how (mutable: updated while the download runs).

    Written on the event loop only: the pool threads' per-stage seconds travel in each
    landed batch and are added as it lands.
    """

    bytes_downloaded: int = 0  # network bytes in this run (headers and bodies' payload), HTTP heads excluded
    bytes_total: int = 0  # size of the .slm file
    chunks_total: int = 0
    chunks_cached: int = 0  # already in the cache when the run started
    chunks_fetched: int = 0
    integrity_failures: int = 0
    retries: int = 0
    seconds: float = 0.0
    receive_wait_s: float = 0.0  # waiting for body bytes (summed over connections)
    verify_s: float = 0.0  # sha256, summed over pool threads
    decompress_s: float = 0.0  # zstd, summed over pool threads
    store_s: float = 0.0  # pwrite into the store, summed over pool threads
    commit_s: float = 0.0  # fdatasync + journal on the commit thread (off the data path)
    bytes_by_source: dict[str, int] = dataclasses.field(default_factory=dict)  # URL -> bytes it sent (with mirrors: each one's share)
    # an update (docs/updates.md): chunks copied from other cached models, and chunks rebuilt from a delta file
    chunks_local: int = 0  # copied from another cached model (same sha256), checked against its journal
    bytes_local: int = 0  # their compressed size in the file: bytes not downloaded
    chunks_delta: int = 0  # rebuilt from a cached version and a delta file, checked against the raw digest
    bytes_delta: int = 0  # moved over the network from delta files (their index and pieces; in bytes_downloaded too)


@dataclasses.dataclass(frozen=True, slots=True)
class LayerTimes:
    """When one layer moved through the pipeline (perf_counter seconds)."""

    index: int
    name: str
    download: tuple[float, float] | None  # first chunk's receive start, last chunk's receive end
    decompress: tuple[float, float] | None  # first chunk's verify start, last chunk stored
    refinement: tuple[float, float] | None = None  # a progressive layer's refinements: first receive start, last folded


LayerSpans = LayerTimes  # the old name, kept for one release (docs/api.md, "Renamed")
