"""Write .slm files: layers in execution order, chunked, compressed, hashed.

``ModelWriter`` is a small state machine (``WriterStage``): open a layer, add
its tensors, close it, repeat, then ``finish``. Tensors stream through: each is
cut into chunks, compressed on a thread pool and spilled to a temporary data
file, so memory stays near one tensor plus a few chunks. ``finish`` writes the
preamble and manifest (known only now) and then the data region, to a temporary
name that is atomically renamed into place.
"""

from __future__ import annotations

import collections
import concurrent.futures
import enum
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from .constants import (
    DATA_ALIGNMENT,
    DEFAULT_CHUNK_SIZE_BYTES,
    DEFAULT_ZSTD_LEVEL,
    LAYER_ALIGNMENT,
    MAX_CHUNK_RAW_SIZE_BYTES,
    REFINEMENT_PASS,
    TENSOR_ALIGNMENT,
    Codec,
    DType,
    LayerKind,
    QuantScheme,
    align_up,
    written_format_version,
)
from .manifest import BASE_PASS, ChunkEntry, LayerEntry, Manifest, TensorEntry, TokenizerBlob, encode_manifest, parse_manifest
from .quantize import QuantizationError, int8_histogram, split_coarse
from .reader import encode_preamble

logger = logging.getLogger(__name__)

PLANE_ZSTD_LEVEL = 1
"""Chunks of a progressive tensor's coarse levels and refinements: zstd level 3 codes these low-entropy planes 7-18%
above their order-0 entropy, level 1 within 1-3% (all-MiniLM-L6-v2's blocks, coarse_shift 3: coarse + refinement
are 1.033x the int8 bytes at level 1, 1.139x at level 3; ``python tools/bench_progressive.py --levels``)."""

TOKENIZER_ZSTD_LEVEL = 19
"""The tokenizer sits in the manifest, on the path to layer 0: worth the slowest level (once, ~0.1 s)."""

_DTYPE_OF_NUMPY = {np.dtype("float32"): DType.F32, np.dtype("float16"): DType.F16, np.dtype("int8"): DType.I8}


class WriterStage(enum.Enum):
    BETWEEN_LAYERS = "between layers"
    IN_LAYER = "in a layer"
    FINISHED = "finished"


def _compress(raw: bytes, level: int) -> tuple[bytes, bytes]:
    """Compress one chunk (releases the GIL) and hash the result."""
    frame = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    return frame, hashlib.sha256(frame).digest()


class ModelWriter:
    """Build a .slm file layer by layer.

    Example:
        >>> with ModelWriter("tiny.slm", config={"architecture": "demo"}) as w:   # doctest: +SKIP
        ...     w.begin_layer("embeddings")
        ...     w.add_tensor("emb", np.ones((4, 8), np.float32))
        ...     w.end_layer()
        ...     manifest = w.finish()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        config: Mapping[str, Any],
        tokenizer_json: bytes | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        threads: int | None = None,
    ) -> None:
        if not 0 < chunk_size_bytes <= MAX_CHUNK_RAW_SIZE_BYTES:
            raise ValueError(f"chunk_size_bytes must be in (0, {MAX_CHUNK_RAW_SIZE_BYTES}]")
        if "architecture" not in config:
            raise ValueError("config needs an 'architecture' entry")
        self.path = Path(path)
        self._config = dict(config)
        self._tokenizer = None
        if tokenizer_json is not None:
            self._tokenizer = TokenizerBlob(
                codec=Codec.ZSTD,
                raw_size_bytes=len(tokenizer_json),
                data=zstandard.ZstdCompressor(level=TOKENIZER_ZSTD_LEVEL).compress(tokenizer_json),
            )
        self._chunk_size = chunk_size_bytes
        self._level = zstd_level
        self._threads = threads or min(4, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, thread_name_prefix="slm-compress")
        self._in_flight: collections.deque[tuple[concurrent.futures.Future[tuple[bytes, bytes]], int, int, int, int]] = collections.deque()
        self._data_path = self.path.with_name(self.path.name + ".data.tmp")
        self._data = open(self._data_path, "wb")
        # progressive tensors' refinements, spilled raw until every step is written: (layer, store offset, size)
        self._refine_path = self.path.with_name(self.path.name + ".refine.tmp")
        self._refine: Any = None
        self._refinements: list[tuple[int, int, int]] = []
        self._data_size = 0
        self._stage = WriterStage.BETWEEN_LAYERS
        self._layers: list[LayerEntry] = []
        self._tensors: list[TensorEntry] = []
        self._chunks: list[ChunkEntry] = []
        self._names: set[str] = set()
        self._histogram = np.zeros(256, dtype=np.int64)
        self.preview_cosine: float | None = None  # recorded in the manifest's stats (a progressive file's calibration)
        self._any_int8 = False
        self._cursor = 0  # next free byte of the layer store
        self._layer_name = ""
        self._layer_kind = LayerKind.STEP
        self._layer_chunk_size = chunk_size_bytes
        self._layer_start = 0
        self._pending = bytearray()  # raw bytes not yet cut into a chunk
        self._pending_start = 0  # store offset of _pending[0]
        self._pending_dtype: DType | None = None
        self._pending_level = zstd_level

    # ------------------------------------------------------------ stages

    def _expect(self, stage: WriterStage, action: str) -> None:
        if self._stage is not stage:
            raise RuntimeError(f"cannot {action} while {self._stage.value}")

    def begin_layer(self, name: str, *, kind: LayerKind = LayerKind.STEP, chunk_size_bytes: int | None = None) -> int:
        """Open the next layer; returns its index.

        ``kind=LayerKind.ROWS``: a row table, after every step, holding one 2-D tensor; give it
        ``chunk_size_bytes`` of whole rows (``constants.rows_per_chunk``) so a reader can fetch a few rows.
        """
        self._expect(WriterStage.BETWEEN_LAYERS, "begin a layer")
        if kind is LayerKind.STEP and self._layers and self._layers[-1].kind is LayerKind.ROWS:
            raise RuntimeError("row tables come after every execution step")
        if kind is LayerKind.ROWS:
            self._write_refinements()  # after every step's coarse levels, before the row tables
        chunk_size_bytes = self._chunk_size if chunk_size_bytes is None else chunk_size_bytes
        if not 0 < chunk_size_bytes <= self._chunk_size:
            raise ValueError(f"a layer's chunk_size_bytes must be in (0, {self._chunk_size}]")
        self._stage = WriterStage.IN_LAYER
        self._layer_name = name
        self._layer_kind = kind
        self._layer_chunk_size = chunk_size_bytes
        self._cursor = align_up(self._cursor, LAYER_ALIGNMENT)
        self._layer_start = self._cursor
        self._pending_start = self._cursor
        self._pending_dtype = None
        return len(self._layers)

    def add_tensor(
        self,
        name: str,
        array: np.ndarray,
        *,
        quant: QuantScheme = QuantScheme.NONE,
        scales: str | None = None,
        error: QuantizationError | None = None,
        coarse_shift: int | None = None,
    ) -> TensorEntry:
        """Append a tensor to the open layer (f32, f16 or int8; C order is made here).

        ``coarse_shift`` (an int8_row tensor of an execution step): store it progressive, its coarse levels here
        and its refinement after every step (FORMAT.md, "Progressive tensors").
        """
        self._expect(WriterStage.IN_LAYER, "add a tensor")
        if self._layer_kind is LayerKind.ROWS and (array.ndim != 2 or any(t.layer_index == len(self._layers) for t in self._tensors[-1:])):
            raise ValueError(f"row table {self._layer_name!r} holds exactly one 2-D tensor")
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name!r}")
        dtype = _DTYPE_OF_NUMPY.get(array.dtype)
        if dtype is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; only float32, float16 and int8 are stored")
        array = np.ascontiguousarray(array, dtype=dtype.numpy_name)
        refinement = None
        if coarse_shift is not None:
            if quant is not QuantScheme.INT8_ROW or self._layer_kind is not LayerKind.STEP:
                raise ValueError(f"tensor {name!r}: only an int8_row tensor of an execution step can be progressive")
            array, refinement = split_coarse(array, coarse_shift)
        level = self._level if coarse_shift is None else PLANE_ZSTD_LEVEL
        if (dtype is not self._pending_dtype or level != self._pending_level) and self._pending:
            self._flush_pending()  # keep each chunk one dtype (int8 payload compresses, and is measured, alone) and one level
        self._pending_dtype = dtype
        self._pending_level = level
        offset = align_up(self._cursor, TENSOR_ALIGNMENT)
        self._append(bytes(offset - self._cursor))
        self._append(memoryview(array).cast("B"))
        entry = TensorEntry(
            name=name,
            layer_index=len(self._layers),
            dtype=dtype,
            shape=tuple(int(d) for d in array.shape),
            raw_offset=offset,
            quant=quant,
            scales=scales,
            max_abs_error=None if error is None else error.max_abs_error,
            max_rel_error=None if error is None else error.max_rel_error,
            coarse_shift=coarse_shift,
        )
        self._tensors.append(entry)
        self._names.add(name)
        if quant is QuantScheme.INT8_ROW:
            self._histogram += int8_histogram(array if refinement is None else array + refinement)
            self._any_int8 = True
        if refinement is not None:
            if self._refine is None:
                self._refine = open(self._refine_path, "w+b")
            self._refine.write(memoryview(refinement).cast("B"))
            self._refinements.append((len(self._layers), offset, refinement.nbytes))
        return entry

    def end_layer(self) -> LayerEntry:
        """Close the open layer; its last partial chunk is cut here (chunks never span layers)."""
        self._expect(WriterStage.IN_LAYER, "end a layer")
        self._flush_pending()
        layer = LayerEntry(
            index=len(self._layers),
            name=self._layer_name,
            raw_offset=self._layer_start,
            raw_size_bytes=self._cursor - self._layer_start,
            kind=self._layer_kind,
        )
        self._layers.append(layer)
        self._stage = WriterStage.BETWEEN_LAYERS
        return layer

    def finish(self, check: Callable[[Manifest], None] | None = None) -> Manifest:
        """Write the file and return its (re-parsed, validated) manifest.

        ``check``: called on that manifest before the file is put in place; what it raises
        leaves the target path untouched.
        """
        self._expect(WriterStage.BETWEEN_LAYERS, "finish")
        self._write_refinements()
        self._drain(0)
        self._pool.shutdown()
        self._data.close()
        manifest_bytes = encode_manifest(
            config=self._config,
            layers=self._layers,
            tensors=self._tensors,
            chunks=self._chunks,
            tokenizer=self._tokenizer,
            chunk_size_bytes=self._chunk_size,
            int8_histogram=[int(v) for v in self._histogram] if self._any_int8 else None,
            preview_cosine=self.preview_cosine,
        )
        manifest = parse_manifest(manifest_bytes, data_size_bytes=self._data_size)
        if check is not None:
            check(manifest)
        preamble = encode_preamble(len(manifest_bytes), written_format_version(manifest.progressive))
        partial = self.path.with_name(self.path.name + ".partial")
        with open(partial, "wb") as out, open(self._data_path, "rb") as data:
            out.write(preamble)
            out.write(manifest_bytes)
            out.write(bytes(_padding(len(preamble) + len(manifest_bytes))))
            shutil.copyfileobj(data, out, 4 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.path)
        self._data_path.unlink(missing_ok=True)
        self._stage = WriterStage.FINISHED
        logger.info("wrote %s: %d layers, %d chunks, %d data bytes", self.path, len(self._layers), len(self._chunks), self._data_size)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far (the target path is untouched)."""
        if self._stage is WriterStage.FINISHED:
            return
        for future, *_ in self._in_flight:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._data.close()
        self._data_path.unlink(missing_ok=True)
        self._close_refinements()
        self.path.with_name(self.path.name + ".partial").unlink(missing_ok=True)
        self._stage = WriterStage.FINISHED

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()

    # ------------------------------------------------------------ chunking

    def _append(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view.nbytes:
            room = self._layer_chunk_size - len(self._pending)
            self._pending += view[:room]
            view = view[room:]
            self._cursor = self._pending_start + len(self._pending)
            if len(self._pending) == self._layer_chunk_size:
                self._flush_pending()

    def _write_refinements(self) -> None:
        """Every refinement spilled so far, as REFINEMENT_PASS chunks in layer order, each inside its tensor."""
        if self._refine is None:
            return
        self._refine.seek(0)
        for layer_index, raw_offset, size in self._refinements:
            for start in range(0, size, self._chunk_size):
                raw = self._refine.read(min(self._chunk_size, size - start))
                future = self._pool.submit(_compress, raw, PLANE_ZSTD_LEVEL)
                self._in_flight.append((future, layer_index, raw_offset + start, len(raw), REFINEMENT_PASS))
                self._drain(2 * self._threads)
        self._close_refinements()

    def _close_refinements(self) -> None:
        if self._refine is not None:
            self._refine.close()
            self._refine = None
        self._refinements.clear()
        self._refine_path.unlink(missing_ok=True)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        raw = bytes(self._pending)
        future = self._pool.submit(_compress, raw, self._pending_level)
        self._in_flight.append((future, len(self._layers), self._pending_start, len(raw), BASE_PASS))
        self._pending_start += len(raw)
        self._cursor = self._pending_start
        self._pending.clear()
        self._drain(2 * self._threads)

    def _drain(self, keep: int) -> None:
        """Write finished chunks in order until at most ``keep`` are in flight."""
        while len(self._in_flight) > keep:
            future, layer_index, raw_offset, raw_size, pass_index = self._in_flight.popleft()
            frame, sha = future.result()
            self._data.write(frame)
            self._chunks.append(
                ChunkEntry(
                    index=len(self._chunks),
                    layer_index=layer_index,
                    offset=self._data_size,
                    size_bytes=len(frame),
                    raw_offset=raw_offset,
                    raw_size_bytes=raw_size,
                    sha256=sha,
                    pass_index=pass_index,
                )
            )
            self._data_size += len(frame)


def _padding(header_size_bytes: int) -> int:
    """Zero bytes between the manifest and the DATA_ALIGNMENT-aligned data region."""
    return align_up(header_size_bytes, DATA_ALIGNMENT) - header_size_bytes
