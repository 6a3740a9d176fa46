"""FORMAT.md agrees with constants.py: every bound a reader enforces is in its table, every constant it names exists
with the value it states, and it says which version the writer writes."""

from __future__ import annotations

import re
from pathlib import Path

from streamload.formats import constants

FORMAT_MD = (Path(__file__).resolve().parents[2] / "formats" / "FORMAT.md").read_text()
BOUNDS = FORMAT_MD[FORMAT_MD.index("**Bounds**") : FORMAT_MD.index("**Config against tensors.**")]


def test_every_bound_in_constants_is_in_the_table() -> None:
    bounds = [name for name in vars(constants) if name.startswith(("MAX_", "MIN_"))]
    assert len(bounds) >= 12
    assert [name for name in bounds if f"`{name}`" not in BOUNDS] == []


def test_every_constant_the_table_names_exists() -> None:
    named = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", BOUNDS))
    assert named and [name for name in named if not hasattr(constants, name)] == []


def test_the_stated_values_are_the_constants() -> None:
    mib = 1 << 20
    assert (constants.MAX_MANIFEST_SIZE_BYTES, constants.MAX_CHUNK_RAW_SIZE_BYTES, constants.MAX_TOKENIZER_SIZE_BYTES) == (64 * mib,) * 3
    assert constants.MAX_CHUNK_SIZE_BYTES == 128 * mib and constants.MAX_STORE_SIZE_BYTES == 1 << 40
    assert (constants.MAX_TENSOR_NDIM, constants.MAX_NAME_LENGTH, constants.MAX_PASS, constants.MAX_MAP_FIELDS) == (8, 1024, 255, 256)
    assert (constants.MAX_CONFIG_SIZE_BYTES, constants.MAX_ENTRY_SIZE_BYTES, constants.MAX_UNKNOWN_VALUE_SIZE_BYTES) == (
        64 << 10,
        16 << 10,
        16 * mib,
    )
    assert constants.MIN_ZSTD_FRAME_SIZE_BYTES == 9 and list(constants.COARSE_SHIFTS) == [1, 2, 3, 4, 5, 6]
    for stated in (
        "| 64 MiB |",
        "| 1 TiB |",
        "1 to 1024 characters",
        "1 byte to 128 MiB",
        "0 to 255",
        "| 1 to 6 |",
        "data region size / 9",
    ):
        assert stated in BOUNDS, stated


def test_the_versions_it_states_are_the_writers() -> None:
    assert (constants.written_format_version(False), constants.written_format_version(True)) == (2, 3)
    assert constants.READABLE_FORMAT_VERSIONS == (1, 2, 3)
    assert "`streamload convert` writes version 2, and version 3 with `--progressive`" in " ".join(FORMAT_MD.split())
    assert "must be 0 in version 1" not in FORMAT_MD + Path(constants.__file__).read_text()
    assert FORMAT_MD.startswith(f"# The .slm format, version {constants.FORMAT_VERSION}\n")


def test_it_holds_no_measurements() -> None:
    """The spec alone: dated benchmark tables live in docs/benchmarks.md."""
    assert re.search(r"20\d\d-\d\d-\d\d", FORMAT_MD) is None and "python tools/" not in FORMAT_MD


def test_the_delta_layout_it_states_is_the_constants() -> None:
    delta = FORMAT_MD[FORMAT_MD.index("## Delta files") :]
    assert (constants.DELTA_PREAMBLE.size, constants.DELTA_ENTRY.size, constants.DELTA_VERSION) == (56, 64, 1)
    assert constants.DELTA_MAGIC.hex(" ").upper() in delta and f"version {constants.DELTA_VERSION}" in delta
    assert "data_offset = align_up(56 + 64 x entry_count, 64)" in delta and constants.delta_data_offset(3) == 256
    assert constants.MAX_DELTA_ENTRIES == 1 << 24 and "at most 2^24" in delta
    assert [m.name for m in constants.DeltaMethod] == ["WHOLE", "DIFFERENCE"] and "0 whole, 1 difference" in delta
