"""A .slm file taken apart and put back, for the hostile-input tests: ``tools/_support/mutate.py``, shared with the tools (which never import tests)."""

from tools._support.mutate import (
    join_file,
    mutate_bytes,
    mutate_structure,
    read_everything,
    split_file,
)

__all__ = [
    "join_file",
    "mutate_bytes",
    "mutate_structure",
    "read_everything",
    "split_file",
]
