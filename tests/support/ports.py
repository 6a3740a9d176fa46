"""Loopback ports for test servers: ``tools/_support/ports.py``, shared with the tools (which never import tests)."""

from tools._support.ports import (
    free_port,
    wait_for_port,
)

__all__ = [
    "free_port",
    "wait_for_port",
]
