"""Decoding untrusted msgpack within bounds: a value is measured before it is decoded, one list entry at a time,
with msgpack's own limits set from the bytes it may take; a wrong type is a ``ManifestSchemaError`` naming where."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack

from ..errors import (
    FormatError,
    ManifestDecodeError,
    ManifestSchemaError,
    OutOfBoundsError,
)
from .constants import (
    MAX_ENTRY_SIZE_BYTES,
    MAX_MANIFEST_SIZE_BYTES,
    MAX_MAP_FIELDS,
    MAX_NAME_LENGTH,
)


def get(mapping: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str, *, default: Any = ...) -> Any:
    if key not in mapping:
        if default is ...:
            raise ManifestSchemaError(f"manifest {where}: missing field {key!r}; the file is damaged or not a streamload model")
        return default
    value = mapping[key]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ManifestSchemaError(f"manifest {where}: field {key!r} has type {type(value).__name__}, expected {kind}")
    return value


def get_size(mapping: Mapping[str, Any], key: str, where: str, *, limit: int, default: Any = ...) -> int:
    value = get(mapping, key, int, where, default=default)
    if not 0 <= value <= limit:
        raise OutOfBoundsError(f"manifest {where}: {key}={value} is outside [0, {limit}]")
    return value


def get_map(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ManifestSchemaError(f"manifest {where}: expected a map, got {type(value).__name__}")
    return value


def get_name(mapping: Mapping[str, Any], key: str, where: str) -> str:
    value = get(mapping, key, str, where)
    if not value or len(value) > MAX_NAME_LENGTH:
        raise ManifestSchemaError(f"manifest {where}: {key} must be 1..{MAX_NAME_LENGTH} characters")
    return value


# ---------------------------------------------------------------- bounded msgpack decoding
#
# The manifest is read in two kinds of steps: skipping (msgpack's skip() walks a value without
# building any object) to learn where each value starts and ends, then decoding a value only
# once its encoded size is known to be under its bound. Nothing is decoded that could cost more
# than a small multiple of its bytes, whatever the msgpack nests inside it.

DECODE_ERRORS = (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, msgpack.OutOfData, UnicodeDecodeError)
ByteRange = tuple[int, int]  # [start, end) of one encoded value in the manifest bytes


def decode_failed(exc: Exception) -> ManifestDecodeError:
    return ManifestDecodeError(f"manifest is not valid msgpack ({exc or type(exc).__name__}); the file is damaged, fetch it again")


def is_map(first_byte: int) -> bool:
    return 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF)


def is_str(first_byte: int) -> bool:
    return 0xA0 <= first_byte <= 0xBF or first_byte in (0xD9, 0xDA, 0xDB)


def is_array(first_byte: int) -> bool:
    return 0x90 <= first_byte <= 0x9F or first_byte in (0xDC, 0xDD)


def msgpack_limits(limit_bytes: int) -> dict[str, int]:
    """msgpack's per-object caps: no string, blob, array or map may claim more than ``limit_bytes`` elements."""
    return {
        "max_str_len": limit_bytes,
        "max_bin_len": limit_bytes,
        "max_array_len": limit_bytes,
        "max_map_len": min(limit_bytes, MAX_MAP_FIELDS),
        "max_ext_len": limit_bytes,
    }


def unpacker(data: bytes, start: int, *, limit_bytes: int) -> msgpack.Unpacker:
    """An unpacker reading ``data`` from ``start`` that decodes no container or string longer than ``limit_bytes``."""
    stream = io.BytesIO(data)  # shares the bytes object's buffer: no copy
    stream.seek(start)
    return msgpack.Unpacker(
        stream,
        raw=False,
        strict_map_key=True,
        max_buffer_size=MAX_MANIFEST_SIZE_BYTES,
        **msgpack_limits(limit_bytes),
    )


def locate_map_values(data: bytes, byte_range: ByteRange, where: str) -> dict[str, ByteRange]:
    """Where each key's value lies in an encoded map, found by skipping (nothing inside is decoded)."""
    start, end = byte_range
    if not is_map(data[start]):
        try:
            unpacker(data, start, limit_bytes=0).skip()
        except DECODE_ERRORS as exc:
            raise decode_failed(exc) from None
        raise ManifestSchemaError(f"manifest {where}: expected a map")
    scout = unpacker(data, start, limit_bytes=MAX_NAME_LENGTH * 4)
    ranges: dict[str, ByteRange] = {}
    try:
        count = scout.read_map_header()
        if count > MAX_MAP_FIELDS:
            raise ManifestSchemaError(f"manifest {where}: {count} keys, over the limit of {MAX_MAP_FIELDS}")
        for _ in range(count):
            key_start = start + scout.tell()
            if key_start >= end:
                raise ManifestDecodeError(f"manifest {where}: the map is truncated; the file is damaged, fetch it again")
            if not is_str(data[key_start]):  # a key is decoded only once known to be a (bounded) string
                raise ManifestSchemaError(f"manifest {where}: a key is not a string")
            key = scout.unpack()
            value_start = start + scout.tell()
            scout.skip()
            ranges[key] = (value_start, start + scout.tell())
    except FormatError:
        raise
    except DECODE_ERRORS as exc:
        raise decode_failed(exc) from None
    if start + scout.tell() != end:
        raise ManifestDecodeError(f"manifest {where}: {end - start - scout.tell()} bytes after the map; the file is damaged")
    return ranges


def decode(data: bytes, byte_range: ByteRange, where: str, *, limit_bytes: int) -> Any:
    """One value, decoded only when its encoding is at most ``limit_bytes``."""
    start, end = byte_range
    if end - start > limit_bytes:
        raise ManifestSchemaError(f"manifest {where}: {end - start} bytes, over the {limit_bytes}-byte limit")
    try:
        return msgpack.unpackb(
            memoryview(data)[start:end],
            raw=False,
            strict_map_key=True,
            **msgpack_limits(limit_bytes),
        )
    except DECODE_ERRORS as exc:
        raise decode_failed(exc) from None


def list_entries(data: bytes, byte_range: ByteRange, where: str, *, max_count: int | None = None) -> Iterator[tuple[int, Any]]:
    """(index, decoded entry) of an encoded list, one entry alive at a time, each at most MAX_ENTRY_SIZE_BYTES."""
    start, _ = byte_range
    if not is_array(data[start]):
        raise ManifestSchemaError(f"manifest root: field {where!r} must be a list")
    scout = unpacker(data, start, limit_bytes=0)  # only skips
    decoder = unpacker(data, start, limit_bytes=MAX_ENTRY_SIZE_BYTES)
    try:
        count = scout.read_array_header()
        decoder.read_array_header()
        if max_count is not None and count > max_count:
            raise OutOfBoundsError(f"manifest: {count} {where}, more than the file can hold ({max_count})")
        for index in range(count):
            before = scout.tell()
            scout.skip()
            if scout.tell() - before > MAX_ENTRY_SIZE_BYTES:
                raise ManifestSchemaError(
                    f"manifest {where}[{index}]: {scout.tell() - before} bytes, over the {MAX_ENTRY_SIZE_BYTES}-byte limit"
                )
            yield index, decoder.unpack()
    except FormatError:
        raise
    except DECODE_ERRORS as exc:
        raise decode_failed(exc) from None


# ---------------------------------------------------------------- entries
