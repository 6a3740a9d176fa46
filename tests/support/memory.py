"""A process's resident memory, for the tests that bound it: ``tools/_support/memory.py``, shared with the tools (which never import tests)."""

from tools._support.memory import (
    peak_rss_bytes,
    rss_bytes,
)

__all__ = [
    "peak_rss_bytes",
    "rss_bytes",
]
