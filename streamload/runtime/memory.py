"""How much memory a run may use, and what stays resident inside it.

A budget comes from, in order: the caller (``run(..., memory_budget_bytes=...)``, the CLI's ``--memory-budget``),
the environment variable STREAMLOAD_MEMORY_BUDGET (read by the caller of ``resolve_memory_budget``), or the memory
limit of the cgroup the process runs in (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the smallest along the
path to the root). Both cgroup versions count the page cache of the files a process reads, so a model whose memory map
is read front to back on every token thrashes inside a limit below its size: the page cache's LRU evicts each page
just before its next use. ``plan_residency`` splits the weights a decode step reads into what stays resident (copies
in anonymous memory, which a cgroup cannot evict) and what is read from the store again on every token
(``residency.SegmentReader``: one reused ring, the next segment's read overlapped with the current one's compute).

What a decode step costs under a budget, all counted (``ResidencyPlan.costs``): the process as it stands (its
anonymous memory: the interpreter, numpy, the tokenizer, buffers already made), the KV cache
(2 x blocks x kv heads x positions x head dim x 4 bytes), the activations and the cast tiles, the read ring (the largest
segment and LOOKAHEAD_BYTES more), the resident weights, and a margin.
Float32 weight copies are not made under a budget (decode runs on int8 tiles either way).

State: none. One call changes the process rather than a run: ``map_large_allocations``, a process-level switch of the
C heap (glibc has one heap per process), which a decoder's run under a budget turns on and leaves on; it is
idempotent and keeps no flag here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import MemoryBudgetError, UsageError

logger = logging.getLogger(__name__)

BUDGET_ENV = "STREAMLOAD_MEMORY_BUDGET"
NO_BUDGET_WORDS = ("none", "off", "unlimited")  # what --memory-budget and the variable take for "no limit"
UNLIMITED_BYTES = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1; anything this large is none
MARGIN_BYTES = 16 << 20  # allocator slack, the sampler's and tokenizer's small arrays, page cache of buffered reads in flight
LOOKAHEAD_BYTES = 32 << 20  # the read ring beyond the largest segment: ~13 ms of reading at 2.4 GB/s, more than a block computes
PAGE_BYTES = 4096
MAX_SIZE_BYTES = 1 << 62  # a size parsed from text: anything larger is a typo, not a machine
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION_BYTES = 128 << 10  # under a budget, C-heap allocations this large or larger get mappings of their own

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size_bytes(text: str) -> int:
    """'640M', '1.5G', '320MiB', '1000000' -> bytes (k, M, G, T are powers of 1024, as in ``ulimit``, cgroups and curl).

    Raises:
        UsageError: not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise UsageError(f"not a size: {text!r} (write bytes, or a number with k, M, G or T, e.g. 640M)")
    number, unit = float(match.group(1)), match.group(2).lower()
    size = number * (1 << (10 * " kmgt".index(unit or " ")))
    if not size < MAX_SIZE_BYTES:
        raise UsageError(f"not a size: {text[:40]!r} is more than any machine's memory (at most 2**62 bytes)")
    return int(size)


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``), so that what the process holds is what
    it uses: a prefill's freed temporaries would otherwise stay counted against a budget. Elsewhere nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def map_large_allocations() -> None:
    """Switch the process's C heap to serving allocations of LARGE_ALLOCATION_BYTES and more from their own mappings
    (glibc's ``M_MMAP_THRESHOLD``), so a freed activation goes back to the system at once instead of staying in the
    heap, where a memory cgroup counts it: a long prompt's prefill under a budget left 150 MiB of freed temporaries in
    the heap without it, and was killed for it.

    A process-level switch: glibc has one heap per process, so it cannot be scoped to a run, and it stays on for the
    rest of the process, the host application's allocations included (a large one then costs a mapping of its own).
    A decoder's run under a memory budget turns it on (``generate.generate``); runs without a budget leave the heap as it
    is. Idempotent: each call sets the same value, and nothing is remembered here. Elsewhere than glibc: nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Bytes a run may use in all (the process's memory and the page cache it causes), and where that figure came from."""

    total_bytes: int
    source: str  # "argument", "STREAMLOAD_MEMORY_BUDGET", "cgroup v2 memory.max at ...", "cgroup v1 ..."

    def __post_init__(self) -> None:
        if self.total_bytes <= 0:
            raise UsageError(f"a memory budget must be positive, got {self.total_bytes} bytes ({self.source})")


def read_cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> MemoryBudget | None:
    """The memory limit of this process's cgroup (the smallest along its path to the root), or None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[int, str]] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2's unified hierarchy
            found.extend(_limits_along(root, path, "memory.max", "cgroup v2"))
        elif "memory" in controllers.split(","):  # cgroup v1's memory controller
            found.extend(_limits_along(root / "memory", path, "memory.limit_in_bytes", "cgroup v1"))
    if not found:
        return None
    limit, where = min(found)
    return MemoryBudget(limit, where)


def _limits_along(mount: Path, path: str, filename: str, version: str) -> list[tuple[int, str]]:
    """Each limit set on ``path`` and its ancestors below ``mount`` (a container may see only its own part)."""
    limits = []
    directory = mount / path.strip("/")
    while True:
        try:
            text = (directory / filename).read_text().strip()
        except OSError:
            text = ""
        if text and text != "max" and text.isdigit() and 0 < int(text) < UNLIMITED_BYTES:
            limits.append((int(text), f"{version} {filename} at {directory}"))
        if directory == mount or mount not in directory.parents:
            return limits
        directory = directory.parent


def resolve_memory_budget(explicit_bytes: int | None = None, environ: Mapping[str, str] | None = None) -> MemoryBudget | None:
    """The budget a run keeps to: ``explicit_bytes``, else ``environ[STREAMLOAD_MEMORY_BUDGET]`` (a size, ``none`` or
    ``auto``), else the cgroup's limit.

    None: no limit anywhere (the runtime keeps every weight memory-mapped, as without a budget).

    Raises:
        UsageError: the variable does not hold a size, or a budget is not positive.
    """
    if explicit_bytes is not None:
        return MemoryBudget(explicit_bytes, "argument")
    text = (environ or {}).get(BUDGET_ENV, "").strip()
    if text.lower() in NO_BUDGET_WORDS:
        return None
    if text and text.lower() != "auto":
        try:
            return MemoryBudget(parse_size_bytes(text), BUDGET_ENV)
        except UsageError as exc:
            raise UsageError(f"${BUDGET_ENV}: {exc}") from None
    return read_cgroup_memory_limit()


def process_anonymous_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): what a cgroup cannot reclaim from it (no swap here).
    Mapped file pages are left out: they are the page cache the plan accounts for on its own."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    """A range of the layer store that decode reads as one piece: a block's layer, or rows of the head's matrix."""

    name: str  # "block 3", "head rows 0-32767"
    offset: int  # in the layer store
    size_bytes: int
    block: int | None  # the block this is, or None for rows of the head
    rows: tuple[int, int] | None = None  # the head matrix's rows [first, end)


@dataclasses.dataclass(frozen=True, slots=True)
class ResidencyPlan:
    """Which segments stay resident and which are read from the store on every decode step, and what each part costs."""

    budget: MemoryBudget
    segments: tuple[Segment, ...]  # in the order a decode step uses them
    resident: frozenset[int]  # indices into segments
    ring_bytes: int  # the ring the streamed segments are read into (``residency.SegmentReader``)
    costs: Mapping[str, int]  # bytes: process, kv_cache, activations, read_ring, resident_weights, margin

    @property
    def streamed(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.segments)) if i not in self.resident)

    @property
    def streamed_bytes_per_step(self) -> int:
        return sum(self.segments[i].size_bytes for i in self.streamed)

    @property
    def all_resident(self) -> bool:
        return len(self.resident) == len(self.segments)

    def describe(self) -> str:
        costs = ", ".join(f"{name} {_mib(size)}" for name, size in self.costs.items())
        return (
            f"memory budget {_mib(self.budget.total_bytes)} ({self.budget.source}): {len(self.resident)} of {len(self.segments)} "
            f"weight segments resident, {_mib(self.streamed_bytes_per_step)} read per token; {costs}"
        )


def _mib(size_bytes: int) -> str:
    if size_bytes < 1 << 20:
        return f"{size_bytes} bytes" if size_bytes < 1 << 10 else f"{size_bytes / (1 << 10):.1f} KiB"
    return f"{size_bytes / (1 << 20):.1f} MiB"


def plan_residency(
    budget: MemoryBudget,
    segments: Sequence[Segment],
    *,
    fixed_costs: Mapping[str, int],
) -> ResidencyPlan:
    """Keep resident what fits after the fixed costs and the read ring, the first segments first (a step starts on
    them while the reader fetches the first streamed one); read the rest on every step. The ring holds the largest
    segment and LOOKAHEAD_BYTES more, so the next read goes on while a segment computes.

    Everything resident when it all fits without buffers: the plan then reads nothing.

    Raises:
        MemoryBudgetError: the fixed costs and the read ring do not fit; names the minimum.
    """
    fixed = dict(fixed_costs) | {"margin": MARGIN_BYTES}
    weights = sum(s.size_bytes for s in segments)
    if sum(fixed.values()) + weights <= budget.total_bytes:
        return ResidencyPlan(budget, tuple(segments), frozenset(range(len(segments))), 0, fixed | {"resident_weights": weights})
    largest = max(s.size_bytes for s in segments)
    whole_pages = _round_up(largest, PAGE_BYTES)
    ring_bytes = whole_pages + PAGE_BYTES + min(LOOKAHEAD_BYTES, whole_pages)  # + a page: a direct read's alignment
    costs = fixed | {"read_ring": ring_bytes}
    _check_minimum(budget, costs)
    room = budget.total_bytes - sum(costs.values())
    resident = []
    for index, segment in enumerate(segments):
        if segment.size_bytes <= room:
            resident.append(index)
            room -= segment.size_bytes
    kept = sum(segments[i].size_bytes for i in resident)
    return ResidencyPlan(budget, tuple(segments), frozenset(resident), ring_bytes, costs | {"resident_weights": kept})


@dataclasses.dataclass(frozen=True, slots=True)
class SinglePassPlan:
    """An encoder's pass under a budget: its layers stay mapped when they fit beside the fixed costs; otherwise each
    layer's pages are dropped after its compute (one pass reads each layer once: nothing is read twice)."""

    budget: MemoryBudget
    drop_after_use: bool
    float_weight_bytes: int  # room left for float32 copies of int8 weights (0: int8 only)
    costs: Mapping[str, int]


def plan_single_pass(
    budget: MemoryBudget, layer_sizes: Sequence[int], *, fixed_costs: Mapping[str, int], float_weight_cap: int
) -> SinglePassPlan:
    """Keep the layers mapped if they all fit, with float32 copies in what is left (at most ``float_weight_cap``);
    otherwise hold one layer at a time.

    Raises:
        MemoryBudgetError: the fixed costs and the largest layer do not fit; names the minimum.
    """
    fixed = dict(fixed_costs) | {"margin": MARGIN_BYTES}
    weights = sum(layer_sizes)
    room = budget.total_bytes - sum(fixed.values()) - weights
    if room >= 0:
        return SinglePassPlan(budget, False, min(float_weight_cap, room), fixed | {"weights": weights})
    costs = fixed | {"largest_layer": max(layer_sizes, default=0)}
    _check_minimum(budget, costs)
    return SinglePassPlan(budget, True, 0, costs)


def _check_minimum(budget: MemoryBudget, costs: Mapping[str, int]) -> None:
    """Raise MemoryBudgetError, naming the minimum and its parts, when ``costs`` do not fit ``budget``."""
    minimum = sum(costs.values())
    if minimum > budget.total_bytes:
        raise MemoryBudgetError(
            f"a memory budget of {_mib(budget.total_bytes)} ({budget.source}) is too small to run this model: it needs at least "
            f"{_mib(minimum)} ({', '.join(f'{name} {_mib(size)}' for name, size in costs.items())})",
            minimum_bytes=minimum,
        )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
