"""A process's resident memory from /proc (Linux; stdlib only): now (VmRSS) and its high-water mark (VmHWM).

VmHWM is this process image's own peak: ``ru_maxrss`` would include the parent's pages, kept across fork and exec.
"""

from __future__ import annotations


def _status_bytes(field: str, pid: int | str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/status has no {field}")


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of process ``pid`` now."""
    return _status_bytes("VmRSS", pid)


def peak_rss_bytes(pid: int | str = "self") -> int:
    """The highest resident memory process ``pid`` has had."""
    return _status_bytes("VmHWM", pid)
