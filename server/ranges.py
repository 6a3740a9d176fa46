"""Range request semantics of RFC 9110 section 14, for one representation of known size."""

from __future__ import annotations

import dataclasses
import enum
import re

MAX_RANGE_HEADER_LENGTH = 1024
"""Longer Range headers are refused with 400 before parsing (a header is no place for a novel)."""

# Any number of digits: a last-byte-pos past the end is clamped (section 14.1.2), however large; the
# header's length cap keeps int() cheap.
_SINGLE = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")


class RangeOutcome(enum.Enum):
    FULL = "full"  # 200: no usable Range header (absent, other unit, multiple ranges, If-Range mismatch)
    PARTIAL = "partial"  # 206 with Content-Range
    UNSATISFIABLE = "unsatisfiable"  # 416 with Content-Range: bytes */size
    BAD_REQUEST = "bad request"  # 400: header too long


@dataclasses.dataclass(frozen=True, slots=True)
class RangeDecision:
    outcome: RangeOutcome
    start: int = 0
    end: int = 0  # exclusive

    @property
    def length(self) -> int:
        return self.end - self.start


def decide_range(header: str | None, size_bytes: int, *, if_range: str | None = None, etag: str = "") -> RangeDecision:
    """Decide how to answer a GET for ``size_bytes`` bytes given its Range / If-Range headers.

    RFC 9110 section 14.2: a server MAY ignore Range; we serve one range, and
    answer several with the whole representation (200), which every client handles.
    Section 13.1.5: If-Range with an entity tag applies the range only when the
    tag matches strongly; with a date (we do not compare dates) the range is ignored.
    Section 14.1.2: ``first-last``, ``first-`` and the suffix ``-length``.
    Section 15.5.17: 416 when no range overlaps the representation.
    """
    full = RangeDecision(RangeOutcome.FULL, 0, size_bytes)
    if header is None:
        return full
    if len(header) > MAX_RANGE_HEADER_LENGTH:
        return RangeDecision(RangeOutcome.BAD_REQUEST)
    if if_range is not None and (if_range.startswith("W/") or if_range != etag):
        return full
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return full  # section 14.2: ignore a range unit we do not understand
    if "," in spec:
        return full
    match = _SINGLE.match(spec)
    if match is None or match.group(1) == match.group(2) == "":
        return RangeDecision(RangeOutcome.UNSATISFIABLE)  # invalid ranges-specifier: section 14.2 lets us reject
    first, last = match.groups()
    if first == "":  # suffix-range: the last N bytes
        suffix = int(last)
        if suffix == 0 or size_bytes == 0:
            return RangeDecision(RangeOutcome.UNSATISFIABLE)
        return RangeDecision(RangeOutcome.PARTIAL, max(0, size_bytes - suffix), size_bytes)
    start = int(first)
    if last != "" and int(last) < start:
        return RangeDecision(RangeOutcome.UNSATISFIABLE)  # section 14.1.1: invalid when last < first
    end = size_bytes if last == "" else min(int(last) + 1, size_bytes)  # section 14.1.2: clamp to the end
    if start >= size_bytes:
        return RangeDecision(RangeOutcome.UNSATISFIABLE)
    return RangeDecision(RangeOutcome.PARTIAL, start, end)
