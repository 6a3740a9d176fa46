"""Write .slm files: layers in execution order, chunked, compressed, hashed.

``ModelWriter`` is a small state machine (``WriterStage``): open a layer, add
its tensors, close it, repeat, then ``finish``. A tensor is added whole
(``add_tensor``) or a block of rows at a time (``begin_tensor``, ``add_rows``,
``end_tensor``): its bytes are cut into chunks here, compressed on a thread pool
and spilled to a temporary data file (``chunk_spill.ChunkSpill``: ``threads``
workers, at most twice that many chunks in flight), so memory stays near the
block given plus a few chunks. ``finish`` writes the preamble and manifest (known
only now) and then the data region, to a temporary name that is atomically
renamed into place.

The files the writer writes drop their pages from the page cache as they go
(``page_cache.PageReleasingFile``, every ``RELEASE_BYTES``), so that writing a
model larger than a memory-limited cgroup does not fill it with dirty page cache.

Threads: the caller's, plus the compression pool's.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from ..errors import UsageError, WriterStageError
from .chunk_spill import ChunkSpill
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
from .manifest import BASE_PASS, LayerEntry, Manifest, TensorEntry, TokenizerBlob, encode_manifest, parse_manifest
from .page_cache import PageReleasingFile, copy_releasing, drop_cached
from .quantize import QuantizationReport, int8_histogram, split_coarse
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
    IN_TENSOR = "in a tensor"
    FINISHED = "finished"


@dataclasses.dataclass(slots=True)
class _OpenTensor:
    """The tensor ``begin_tensor`` opened: what ``add_rows`` checks each block against."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    raw_offset: int
    quant: QuantScheme
    scales: str | None
    coarse_shift: int | None
    row_elements: int  # elements per row: a block's size must be a multiple of it
    elements_added: int = 0


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
            raise UsageError(f"chunk_size_bytes must be in (0, {MAX_CHUNK_RAW_SIZE_BYTES}]")
        if "architecture" not in config:
            raise UsageError("config needs an 'architecture' entry")
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
        self._spill = ChunkSpill(self.path.with_name(self.path.name + ".data.tmp"), threads or min(4, os.cpu_count() or 1))
        # progressive tensors' refinements, spilled raw until every step is written: (layer, store offset, size)
        self._refine_path = self.path.with_name(self.path.name + ".refine.tmp")
        self._refine: PageReleasingFile | None = None
        self._refinements: list[tuple[int, int, int]] = []
        self._stage = WriterStage.BETWEEN_LAYERS
        self._layers: list[LayerEntry] = []
        self._tensors: list[TensorEntry] = []
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
        self._open: _OpenTensor | None = None  # the tensor between begin_tensor and end_tensor

    # ------------------------------------------------------------ stages

    def _expect(self, stage: WriterStage, action: str) -> None:
        if self._stage is not stage:
            raise WriterStageError(f"cannot {action} while {self._stage.value}")

    def begin_layer(self, name: str, *, kind: LayerKind = LayerKind.STEP, chunk_size_bytes: int | None = None) -> int:
        """Open the next layer; returns its index.

        ``kind=LayerKind.ROWS``: a row table, after every step, holding one 2-D tensor; give it
        ``chunk_size_bytes`` of whole rows (``constants.rows_per_chunk``) so a reader can fetch a few rows.
        """
        self._expect(WriterStage.BETWEEN_LAYERS, "begin a layer")
        if kind is LayerKind.STEP and self._layers and self._layers[-1].kind is LayerKind.ROWS:
            raise WriterStageError("row tables come after every execution step")
        if kind is LayerKind.ROWS:
            self._write_refinements()  # after every step's coarse levels, before the row tables
        chunk_size_bytes = self._chunk_size if chunk_size_bytes is None else chunk_size_bytes
        if not 0 < chunk_size_bytes <= self._chunk_size:
            raise UsageError(f"a layer's chunk_size_bytes must be in (0, {self._chunk_size}]")
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
        error: QuantizationReport | None = None,
        coarse_shift: int | None = None,
    ) -> TensorEntry:
        """Append a whole tensor to the open layer (f32, f16 or int8; C order is made here).

        ``coarse_shift`` (an int8_row tensor of an execution step): store it progressive, its coarse levels here
        and its refinement after every step (FORMAT.md, "Progressive tensors").
        """
        self._expect(WriterStage.IN_LAYER, "add a tensor")
        dtype = _DTYPE_OF_NUMPY.get(array.dtype)
        if dtype is None:
            raise UsageError(f"tensor {name!r} has dtype {array.dtype}; only float32, float16 and int8 are stored")
        self.begin_tensor(name, array.shape, dtype, quant=quant, scales=scales, coarse_shift=coarse_shift)
        self.add_rows(array)
        return self.end_tensor(error)

    def begin_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: DType,
        *,
        quant: QuantScheme = QuantScheme.NONE,
        scales: str | None = None,
        coarse_shift: int | None = None,
    ) -> None:
        """Open a tensor of the open layer whose values ``add_rows`` gives, a block of rows at a time."""
        self._expect(WriterStage.IN_LAYER, "add a tensor")
        if self._layer_kind is LayerKind.ROWS and (len(shape) != 2 or any(t.layer_index == len(self._layers) for t in self._tensors[-1:])):
            raise UsageError(f"row table {self._layer_name!r} holds exactly one 2-D tensor")
        if name in self._names:
            raise UsageError(f"duplicate tensor name {name!r}")
        if dtype not in _DTYPE_OF_NUMPY.values():
            raise UsageError(f"tensor {name!r} has dtype {dtype.name}; only float32, float16 and int8 are stored")
        if coarse_shift is not None and (quant is not QuantScheme.INT8_ROW or self._layer_kind is not LayerKind.STEP):
            raise UsageError(f"tensor {name!r}: only an int8_row tensor of an execution step can be progressive")
        level = self._level if coarse_shift is None else PLANE_ZSTD_LEVEL
        if (dtype is not self._pending_dtype or level != self._pending_level) and self._pending:
            self._flush_pending()  # keep each chunk one dtype (int8 payload compresses, and is measured, alone) and one level
        self._pending_dtype = dtype
        self._pending_level = level
        offset = align_up(self._cursor, TENSOR_ALIGNMENT)
        self._append(bytes(offset - self._cursor))
        shape = tuple(int(d) for d in shape)
        row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
        self._open = _OpenTensor(name, dtype, shape, offset, quant, scales, coarse_shift, row_elements)
        self._stage = WriterStage.IN_TENSOR

    def add_rows(self, rows: np.ndarray) -> None:
        """Append the open tensor's next rows (any shape holding whole rows, in C order; converted to its dtype)."""
        self._expect(WriterStage.IN_TENSOR, "add rows")
        tensor = self._open
        assert tensor is not None
        if rows.size % tensor.row_elements or tensor.elements_added + rows.size > math.prod(tensor.shape):
            raise UsageError(f"tensor {tensor.name!r}: {rows.shape} is not whole rows of the {tensor.shape} still to come")
        values = np.ascontiguousarray(rows, dtype=tensor.dtype.numpy_name)
        if tensor.quant is QuantScheme.INT8_ROW:
            self._histogram += int8_histogram(values)
            self._any_int8 = True
        if tensor.coarse_shift is not None:
            values, refinement = split_coarse(values, tensor.coarse_shift)
            if self._refine is None:
                self._refine = PageReleasingFile(self._refine_path, "w+b")
            self._refine.write(memoryview(refinement).cast("B"))
        self._append(memoryview(values).cast("B"))
        tensor.elements_added += values.size

    def end_tensor(self, error: QuantizationReport | None = None) -> TensorEntry:
        """Close the open tensor once every row is in; ``error``: what quantizing it cost, for the manifest."""
        self._expect(WriterStage.IN_TENSOR, "end a tensor")
        tensor = self._open
        assert tensor is not None
        size = math.prod(tensor.shape)
        if tensor.elements_added != size:
            raise UsageError(f"tensor {tensor.name!r}: {tensor.elements_added} of its {size} values were added")
        entry = TensorEntry(
            name=tensor.name,
            layer_index=len(self._layers),
            dtype=tensor.dtype,
            shape=tensor.shape,
            raw_offset=tensor.raw_offset,
            quant=tensor.quant,
            scales=tensor.scales,
            max_abs_error=None if error is None else error.max_abs_error,
            max_rel_error=None if error is None else error.max_rel_error,
            coarse_shift=tensor.coarse_shift,
        )
        self._tensors.append(entry)
        self._names.add(tensor.name)
        if tensor.coarse_shift is not None:
            self._refinements.append((len(self._layers), tensor.raw_offset, size))  # int8: one byte a value
        self._open = None
        self._stage = WriterStage.IN_LAYER
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
        self._spill.close()
        manifest_bytes = encode_manifest(
            config=self._config,
            layers=self._layers,
            tensors=self._tensors,
            chunks=self._spill.chunks,
            tokenizer=self._tokenizer,
            chunk_size_bytes=self._chunk_size,
            int8_histogram=[int(v) for v in self._histogram] if self._any_int8 else None,
            preview_cosine=self.preview_cosine,
        )
        manifest = parse_manifest(manifest_bytes, data_size_bytes=self._spill.size_bytes)
        if check is not None:
            check(manifest)
        preamble = encode_preamble(len(manifest_bytes), written_format_version(manifest.progressive))
        partial = self.path.with_name(self.path.name + ".partial")
        out = PageReleasingFile(partial, "wb")
        with out.file, open(self._spill.path, "rb") as data:
            out.write(preamble)
            out.write(manifest_bytes)
            out.write(bytes(_padding(len(preamble) + len(manifest_bytes))))
            copy_releasing(data, out)
            out.file.flush()
            os.fsync(out.file.fileno())
        os.replace(partial, self.path)
        self._spill.path.unlink(missing_ok=True)
        self._stage = WriterStage.FINISHED
        chunks, size = len(self._spill.chunks), self._spill.size_bytes
        logger.info("wrote %s: %d layers, %d chunks, %d data bytes", self.path, len(self._layers), chunks, size)
        return manifest

    def abort(self) -> None:
        """Drop everything written so far (the target path is untouched)."""
        if self._stage is WriterStage.FINISHED:
            return
        self._spill.abort()
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
        spill = self._refine.file
        spill.flush()
        spill.seek(0)
        for layer_index, raw_offset, size in self._refinements:
            for start in range(0, size, self._chunk_size):
                raw = spill.read(min(self._chunk_size, size - start))
                drop_cached(spill.fileno(), 0, spill.tell())  # from 0: see copy_releasing
                self._spill.submit(raw, PLANE_ZSTD_LEVEL, layer_index, raw_offset + start, REFINEMENT_PASS)
        self._close_refinements()

    def _close_refinements(self) -> None:
        if self._refine is not None:
            self._refine.file.close()
            self._refine = None
        self._refinements.clear()
        self._refine_path.unlink(missing_ok=True)

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        raw = bytes(self._pending)
        self._spill.submit(raw, self._pending_level, len(self._layers), self._pending_start, BASE_PASS)
        self._pending_start += len(raw)
        self._cursor = self._pending_start
        self._pending.clear()


def _padding(header_size_bytes: int) -> int:
    """Zero bytes between the manifest and the DATA_ALIGNMENT-aligned data region."""
    return align_up(header_size_bytes, DATA_ALIGNMENT) - header_size_bytes
