"""Mutations of valid .slm files, for fuzzing the reader (tests and tools/fuzz_reader.py)."""

from __future__ import annotations

import copy
import random
from typing import Any

import msgpack

from streamload.formats.constants import PREAMBLE_SIZE_BYTES
from streamload.formats.reader import decompress_chunk, encode_preamble, read_header, read_preamble, verify_chunk

HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    -1,
    0,
    1,
    7,
    63,
    64,
    4095,
    2**31,
    2**32 + 5,
    2**63 - 1,
    -(2**63),
    1.5,
    float("nan"),
    "",
    "x" * 5000,
    "f64",
    "i8",
    "int8_row",
    b"",
    b"\x00" * 32,
    [],
    [0],
    [2**40, 2**40],
    {},
    {"a": 1},
)


def split_file(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(decoded manifest, data region) of a valid file."""
    preamble = read_preamble(data[:PREAMBLE_SIZE_BYTES])
    manifest = msgpack.unpackb(data[PREAMBLE_SIZE_BYTES : PREAMBLE_SIZE_BYTES + preamble.manifest_size_bytes], raw=False)
    return manifest, data[preamble.data_offset :]


def join_file(manifest: Any, data_region: bytes) -> bytes:
    """A file from any (possibly invalid) manifest object and a data region, with a consistent preamble."""
    encoded = msgpack.packb(manifest, use_bin_type=True)
    preamble = encode_preamble(len(encoded))
    header = preamble + encoded
    return header + bytes((-len(header)) % 64) + data_region


def mutate_structure(manifest: Any, rng: random.Random) -> Any:
    """Replace one randomly chosen value anywhere in the manifest tree (in place; returns the root)."""
    node, parent, key = manifest, None, None
    for _ in range(rng.randint(1, 6)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
        elif isinstance(node, list) and node:
            key = rng.randrange(len(node))
        else:
            break
        parent, node = node, node[key]
    replacement = copy.deepcopy(rng.choice(HOSTILE_VALUES))  # shared lists/maps must not be spliced in twice (cycles)
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        replacement = node + rng.choice((-4096, -64, -1, 1, 64, 4096, node))
    if isinstance(replacement, int):
        replacement = max(-(2**63), min(2**64 - 1, replacement))  # msgpack's range: the mutation must stay encodable
    if parent is None:
        return replacement
    if isinstance(parent, dict) and rng.random() < 0.15:
        del parent[key]
    else:
        parent[key] = replacement
    return manifest


def mutate_bytes(data: bytes, rng: random.Random, *, header_bias: float = 0.8) -> bytes:
    """Flip, overwrite, insert, delete or truncate bytes, mostly inside preamble and manifest."""
    buf = bytearray(data)
    header_end = min(len(buf), PREAMBLE_SIZE_BYTES + read_preamble(data[:PREAMBLE_SIZE_BYTES]).manifest_size_bytes)
    for _ in range(rng.randint(1, 8)):
        if not buf:
            break
        limit = header_end if rng.random() < header_bias else len(buf)
        at = rng.randrange(max(1, min(limit, len(buf))))
        action = rng.randrange(5)
        if action == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif action == 1:
            buf[at] = rng.randrange(256)
        elif action == 2:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif action == 3:
            del buf[at : at + rng.randint(1, 9)]
        else:
            del buf[rng.randrange(len(buf)) :]
    return bytes(buf)


def read_everything(data: bytes) -> int:
    """Parse a whole file from bytes and decode every chunk, as a client would; returns raw bytes decoded."""
    preamble, manifest = read_header(data, len(data))
    total = 0
    for chunk in manifest.chunks + manifest.refinement_chunks:
        start = preamble.data_offset + chunk.offset
        frame = memoryview(data)[start : start + chunk.size_bytes]
        verify_chunk(chunk, frame)
        total += len(decompress_chunk(chunk, frame))
    return total
