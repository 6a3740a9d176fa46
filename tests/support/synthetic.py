"""Synthetic models for the tests: ``tools/_support/synthetic.py``, shared with the tools (which never import tests)."""

from tools._support.synthetic import (
    large_manifest,
    llama_config,
    llama_tensor_shapes,
    write_synthetic_int8_model,
    write_synthetic_llama,
)

__all__ = [
    "large_manifest",
    "llama_config",
    "llama_tensor_shapes",
    "write_synthetic_int8_model",
    "write_synthetic_llama",
]
