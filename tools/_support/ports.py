"""Loopback ports for helper processes: a free one, and waiting until one accepts (stdlib only)."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A loopback port nobody listens on now (the caller binds it soon after; another process may take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 15.0) -> None:
    """Return once something accepts connections on the loopback port; TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s:.0f} s")
