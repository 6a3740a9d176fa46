"""Manifest memory bombs: refused quickly, and parsing any manifest costs a small multiple of its bytes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import msgpack
import pytest

from streamload import errors
from streamload.formats.constants import MAX_MANIFEST_SIZE_BYTES, PREAMBLE_SIZE_BYTES
from streamload.formats.manifest import parse_manifest
from tests.support.mutate import split_file
from tests.support.synthetic import large_manifest

GOLDEN = (Path(__file__).parent / "golden" / "tiny.slm").read_bytes()
ROOT = Path(__file__).resolve().parents[2]


def empty_maps(count: int) -> bytes:
    """An encoded array of ``count`` empty maps: 1 byte each on the wire, ~64 bytes each as Python dicts."""
    return b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def with_raw_value(manifest: dict[str, Any], path: list[Any], raw: bytes) -> bytes:
    """The manifest encoded with the value at ``path`` replaced by already-encoded bytes."""
    marker = "\x00marker\x00"
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = marker
    encoded = msgpack.packb(manifest, use_bin_type=True)
    return encoded.replace(msgpack.packb(marker), raw)


MEASURE = """
import json, sys, time
from streamload.errors import FormatError
from streamload.formats.manifest import parse_manifest

sys.path.insert(0, sys.argv[3])  # the repo root: one reader of the peak RSS for tests and tools
from tools._support.memory import peak_rss_bytes

data = open(sys.argv[1], "rb").read()
size = None if sys.argv[2] == "none" else int(sys.argv[2])
before_bytes = peak_rss_bytes()
started = time.perf_counter()
try:
    outcome = f"ok {len(parse_manifest(data, data_size_bytes=size).chunks)}"
except FormatError as exc:
    outcome = f"{type(exc).__name__}: {exc}"
print(json.dumps([outcome, time.perf_counter() - started, peak_rss_bytes() - before_bytes]))
"""


def measure_parse(path: Path, data_size_bytes: int | None) -> tuple[str, float, int]:
    """(outcome, seconds, peak RSS growth in bytes) of parse_manifest on a file's bytes, in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(data_size_bytes or "none"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    outcome, seconds, growth_bytes = json.loads(done.stdout)
    return outcome, seconds, growth_bytes


def test_bomb_in_an_unknown_root_key_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    manifest, _ = split_file(GOLDEN)
    encoded = msgpack.packb(manifest, use_bin_type=True)
    room = MAX_MANIFEST_SIZE_BYTES - len(encoded) - 32
    bomb = with_raw_value(manifest, ["future"], empty_maps(room))  # 67 million empty maps
    assert len(bomb) <= MAX_MANIFEST_SIZE_BYTES
    (tmp_path / "bomb.msgpack").write_bytes(bomb)
    outcome, seconds, growth_bytes = measure_parse(tmp_path / "bomb.msgpack", None)
    assert outcome.startswith("ManifestSchemaError: manifest root: unknown key 'future' holds"), outcome
    assert growth_bytes < len(bomb) // 2, growth_bytes  # skipped, not decoded: decoding it took 4.8 GB (and 5.7 s)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (["chunks", 1, "future_field"], r"chunks\[1\]: \d+ bytes, over the 16384-byte limit"),
        (["tensors", 0, "future_field"], r"tensors\[0\]: \d+ bytes, over the 16384-byte limit"),
        (["config", "future_field"], r"config: \d+ bytes, over the 65536-byte limit"),
        (["tokenizer", "future_field"], None),  # an unknown field of the tokenizer map is skipped, never decoded
        (["stats", "int8_histogram"], r"stats.int8_histogram: \d+ bytes, over the 2307-byte limit"),
        (["layers"], r"layers\[0\]: missing field 'name'"),
        (["chunks"], r"chunks\[0\]: missing field 'sha256'"),
    ],
)
def test_bombs_inside_known_values_cost_a_small_multiple_of_their_bytes(path: list[Any], message: str | None) -> None:
    manifest, _ = split_file(GOLDEN)
    bomb = with_raw_value(manifest, path, empty_maps(4 << 20))  # 4 MiB on the wire, 270 MB as Python objects
    tracemalloc.start()
    try:
        try:
            parse_manifest(bomb)
            outcome = "accepted"
        except errors.FormatError as exc:
            outcome = str(exc)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome == "accepted" if message is None else re.search(message, outcome), outcome
    assert peak_bytes < 2 * len(bomb), peak_bytes


def test_large_legal_manifest_costs_a_small_multiple_of_its_bytes(tmp_path: Path) -> None:
    data, data_size = large_manifest(200_000)
    (tmp_path / "large.msgpack").write_bytes(data)
    outcome, _, growth_bytes = measure_parse(tmp_path / "large.msgpack", data_size)
    assert outcome == "ok 200000"
    # One ChunkEntry (slots) with its ints and sha256 is ~300 bytes for ~110 bytes of msgpack; decoding the
    # whole chunk table first, as the parser did, peaked at 5.7x the manifest's bytes.
    assert growth_bytes < 4.5 * len(data), growth_bytes / len(data)


def test_chunk_count_is_bounded_by_the_data_region() -> None:
    manifest, region = split_file(GOLDEN)
    many = [dict(manifest["chunks"][0], offset=i) for i in range(len(region))]  # more chunks than 9-byte frames fit
    manifest["chunks"] = many
    with pytest.raises(errors.OutOfBoundsError, match=rf"{len(region)} chunks, more than the file can hold \({len(region) // 9}\)"):
        parse_manifest(msgpack.packb(manifest, use_bin_type=True), data_size_bytes=len(region))


def test_chunks_are_no_larger_than_the_declared_chunk_size() -> None:
    manifest, region = split_file(GOLDEN)
    manifest["chunk_size"] = 16
    with pytest.raises(errors.ManifestSchemaError, match=r"chunks\[0\]: raw_size 24 is over the manifest's chunk_size 16"):
        parse_manifest(msgpack.packb(manifest, use_bin_type=True), data_size_bytes=len(region))


def test_root_map_bounds() -> None:
    manifest, _ = split_file(GOLDEN)
    manifest |= {f"k{i}": None for i in range(300)}
    with pytest.raises(errors.ManifestSchemaError, match="keys, over the limit of 256"):
        parse_manifest(msgpack.packb(manifest, use_bin_type=True))
    encoded = msgpack.packb(split_file(GOLDEN)[0], use_bin_type=True)
    key_bomb = bytes([encoded[0] + 1]) + encoded[1:] + empty_maps(1 << 20) + b"\xc0"  # a 1 MiB key
    with pytest.raises(errors.ManifestSchemaError, match="a key is not a string"):
        parse_manifest(key_bomb)
    with pytest.raises(errors.ManifestDecodeError, match="not valid msgpack"):
        parse_manifest(GOLDEN[PREAMBLE_SIZE_BYTES : PREAMBLE_SIZE_BYTES + 100])
    with pytest.raises(errors.ManifestDecodeError, match="the map is truncated"):
        parse_manifest(b"\x82\xa1a\xc0")  # two keys announced, one present


def _parse_both(encoded: bytes, data_size_bytes: int | None) -> tuple[Any, Any]:
    """parse_manifest's result (or error type) with the whole-list chunk reading and with it switched off."""
    from streamload.formats import manifest as module

    outcomes = []
    for canonical in (module.parse_chunks_canonical, lambda *args: None):
        original, module.parse_chunks_canonical = module.parse_chunks_canonical, canonical
        try:
            outcomes.append(parse_manifest(encoded, data_size_bytes=data_size_bytes))
        except errors.FormatError as exc:
            outcomes.append(type(exc))
        finally:
            module.parse_chunks_canonical = original
    return outcomes[0], outcomes[1]


def test_whole_list_chunk_reading_agrees_with_entry_by_entry(tmp_path: Path) -> None:
    """The numpy reading of the writer's chunk entries gives the same manifest, and leaves anything else (a mutated
    byte, a `pass`, a chunk past the data region) to the entry-by-entry path and its error."""
    import random

    from streamload.formats import manifest as module
    from tests.support.synthetic import write_synthetic_int8_model

    path = write_synthetic_int8_model(tmp_path / "small.slm", blocks=3, block_raw_bytes=6000, chunk_size_bytes=512)
    data = path.read_bytes()
    manifest_size = int.from_bytes(data[16:24], "little")
    data_offset = int.from_bytes(data[24:32], "little")
    encoded = data[PREAMBLE_SIZE_BYTES : PREAMBLE_SIZE_BYTES + manifest_size]
    region = len(data) - data_offset
    fast, slow = _parse_both(encoded, region)
    assert fast == slow and len(fast.chunks) > 20
    root = module.locate_map_values(encoded, (0, len(encoded)), "root")
    assert module.parse_chunks_canonical(encoded, root["chunks"], fast.layers, region, 512) == fast.chunk_table  # not a fallback
    assert _parse_both(encoded, region - 1) == (errors.OutOfBoundsError, errors.OutOfBoundsError)
    manifest = msgpack.unpackb(encoded)
    manifest["chunks"][3]["pass"] = 1
    assert len(set(map(repr, _parse_both(msgpack.packb(manifest, use_bin_type=True), region)))) == 1
    rng = random.Random(0)
    start = encoded.index(b"\x86\xa5layer")
    for _ in range(300):
        mutated = bytearray(encoded)
        mutated[rng.randrange(start, len(encoded))] = rng.randrange(256)
        fast, slow = _parse_both(bytes(mutated), region)
        assert fast == slow or fast is slow
