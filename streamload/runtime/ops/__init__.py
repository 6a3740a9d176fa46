"""numpy kernels for int8 weights, grouped by what they are (one namespace: ``ops.linear``, ``ops.dense``, ...).

* ``matmul``: multiplying by int8 weights as stored, a tile of rows cast to float32 at a time (``linear``,
  ``linear_t``); what decoders use.
* ``decode_threads``: in a decode loop (``DecodeThreads``), a large matrix cast and multiplied on two threads, BLAS on
  one (``BLAS_THREADS``).
* ``float_weights``: float32 copies of int8 weights under a byte budget (``FloatWeightCache``) and ``dense``/``dense_t``,
  which multiply several projections of one input by them in one sgemm; what encoders use.
* ``elementwise``: norms, activations, softmax and embedding rows.

State: what the kernels use belongs to their caller, who passes it: float32 copies to the ``FloatWeightCache`` (the
runtime keeps one per model), cast buffers to a ``CastTiles`` (one per run), a decode's helper thread to its
``DecodeThreads`` (one per decode loop). What is process-wide is what the process has once: the BLAS library's thread
count, owned by ``BLAS_THREADS``, which decodes in any thread share (counted under a lock).
"""

from __future__ import annotations

from .decode_threads import (
    BLAS_THREADS,
    DECODE_CAST_TILE_BYTES,
    DEFAULT_DECODE_THREADS,
    PARALLEL_MIN_WEIGHTS,
    PARALLEL_TILE_ELEMENTS,
    BlasThreads,
    DecodeThreads,
)
from .elementwise import embedding, embedding_rows, gelu_tanh, layer_norm, layer_norm_t, rms_norm, silu, softmax
from .float_weights import (
    FLOAT_WEIGHT_BUDGET_CAP_BYTES,
    FloatWeight,
    FloatWeightCache,
    Projection,
    default_float_weight_budget_bytes,
    dense,
    dense_t,
)
from .matmul import DECODE_TOKENS, PREFILL_TILE_ELEMENTS, TILE_ELEMENTS, CastTiles, linear, linear_t

__all__ = [
    "BLAS_THREADS",
    "DECODE_CAST_TILE_BYTES",
    "DECODE_TOKENS",
    "DEFAULT_DECODE_THREADS",
    "FLOAT_WEIGHT_BUDGET_CAP_BYTES",
    "PARALLEL_MIN_WEIGHTS",
    "PARALLEL_TILE_ELEMENTS",
    "PREFILL_TILE_ELEMENTS",
    "TILE_ELEMENTS",
    "BlasThreads",
    "CastTiles",
    "DecodeThreads",
    "FloatWeight",
    "FloatWeightCache",
    "Projection",
    "default_float_weight_budget_bytes",
    "dense",
    "dense_t",
    "embedding",
    "embedding_rows",
    "gelu_tanh",
    "layer_norm",
    "layer_norm_t",
    "linear",
    "linear_t",
    "rms_norm",
    "silu",
    "softmax",
]
