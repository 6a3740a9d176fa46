"""The installed ``streamload`` console script, run as a user runs it: in a subprocess, its output read back."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

STREAMLOAD = str(Path(sys.executable).parent / "streamload")  # the console script pip installed beside this python


def streamload_cli(*args: str, cache: Path | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``streamload ARGS`` with ``cache`` as STREAMLOAD_CACHE (when given), text output captured."""
    env = dict(os.environ)
    if cache is not None:
        env["STREAMLOAD_CACHE"] = str(cache)
    return subprocess.run([STREAMLOAD, *args], capture_output=True, text=True, timeout=timeout_s, env=env)


def assert_one_line_error(done: subprocess.CompletedProcess[str], status: int, *phrases: str) -> None:
    """The command failed with ``status`` and one line on stderr, ``error: ...`` holding each phrase, no traceback."""
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and "Traceback" not in done.stderr, done.stderr
    for phrase in phrases:
        assert phrase in lines[0], done.stderr


def read_terminal(controller: int, process: subprocess.Popen[str] | subprocess.Popen[bytes]) -> Iterator[tuple[bool, bytes]]:
    """What ``process`` writes to the pseudo-terminal whose controller side is ``controller``, one read at a time:
    (the process still running, the bytes), until the child closes the terminal or ends without more to read."""
    while True:
        readable, _, _ = select.select([controller], [], [], 0.05)
        if readable:
            try:
                data = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                return
            if not data:
                return
            yield process.poll() is None, data
        elif process.poll() is not None:
            return
