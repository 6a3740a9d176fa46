from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamload.formats.quantize import entropy_bits_per_symbol, int8_histogram, quantize_int8_rows


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 40)), elements=st.floats(-1e3, 1e3, width=32)))
def test_error_is_at_most_half_a_step_per_row(weight: np.ndarray) -> None:
    q, scales, error = quantize_int8_rows(weight)
    restored = q.astype(np.float32) * scales[:, None]
    step = scales[:, None]
    assert np.all(np.abs(weight - restored) <= step / 2 + 1e-6 * np.abs(weight).max(initial=1))
    assert np.abs(q).max() <= 127
    assert error.max_abs_error == np.abs(weight - restored).max()


def test_zero_rows_quantize_to_zero() -> None:
    q, scales, error = quantize_int8_rows(np.zeros((3, 5), np.float32))
    assert not q.any() and not scales.any() and error.max_abs_error == 0.0


def test_non_finite_weights_are_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="NaN or infinite"):
        quantize_int8_rows(np.array([[1.0, np.nan]], np.float32))


def test_histogram_and_entropy() -> None:
    q = np.array([-128, -1, 0, 0, 127], dtype=np.int8)
    h = int8_histogram(q)
    assert h[0] == 1 and h[127] == 1 and h[128] == 2 and h[255] == 1 and h.sum() == 5
    assert entropy_bits_per_symbol([1, 1, 1, 1]) == 2.0
    assert entropy_bits_per_symbol([0, 8]) == 0.0
