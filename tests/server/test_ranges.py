"""RFC 9110 range decisions, case by case."""

from __future__ import annotations

import pytest

from streamload.server.ranges import MAX_RANGE_HEADER_LENGTH, RangeOutcome, decide_range

P, F, U = RangeOutcome.PARTIAL, RangeOutcome.FULL, RangeOutcome.UNSATISFIABLE


@pytest.mark.parametrize(
    ("header", "outcome", "start", "end"),
    [
        (None, F, 0, 100),
        ("bytes=0-9", P, 0, 10),
        ("bytes=90-", P, 90, 100),
        ("bytes=90-1000", P, 90, 100),  # last-pos past the end is clipped (14.1.2)
        ("bytes=-10", P, 90, 100),  # suffix
        ("bytes=-1000", P, 0, 100),
        ("bytes=100-", U, 0, 0),  # first-pos at the end: unsatisfiable (15.5.17)
        ("bytes=5-4", U, 0, 0),
        ("bytes=-0", U, 0, 0),
        ("bytes=abc", U, 0, 0),
        ("bytes=-", U, 0, 0),
        ("bytes=0-1,5-6", F, 0, 100),  # several ranges: the whole representation
        ("items=0-1", F, 0, 100),  # unknown unit: ignored (14.2)
        ("bytes=99999999999999999999999-", U, 0, 0),
        ("bytes=0-99999999999999999999", P, 0, 100),  # 20 digits, past any file: clamped to the end (14.1.2)
        ("bytes=10-" + "9" * 900, P, 10, 100),
        ("bytes=-99999999999999999999", P, 0, 100),  # a suffix longer than the file: all of it
        ("bytes=00000000000000000000050-59", P, 50, 60),  # leading zeros are still digits
    ],
)
def test_decide_range(header: str | None, outcome: RangeOutcome, start: int, end: int) -> None:
    decision = decide_range(header, 100)
    assert decision.outcome is outcome
    if outcome is not U:
        assert (decision.start, decision.end) == (start, end)


def test_if_range_applies_only_on_a_strong_match() -> None:
    assert decide_range("bytes=0-9", 100, if_range='"abc"', etag='"abc"').outcome is P
    assert decide_range("bytes=0-9", 100, if_range='"old"', etag='"abc"').outcome is F
    assert decide_range("bytes=0-9", 100, if_range='W/"abc"', etag='"abc"').outcome is F
    assert decide_range("bytes=0-9", 100, if_range="Tue, 24 Nov 2026 10:00:00 GMT", etag='"abc"').outcome is F


def test_huge_header_is_a_bad_request() -> None:
    assert decide_range("bytes=" + "0-1," * MAX_RANGE_HEADER_LENGTH, 100).outcome is RangeOutcome.BAD_REQUEST
