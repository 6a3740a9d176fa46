"""The decode split's threads: one helper thread, and every BLAS on one thread while any ``decoding`` block is open.

In ``decoding`` (a decoder's token-by-token loop), a matrix of PARALLEL_MIN_WEIGHTS or more multiplying at most
DECODE_TOKENS rows of x is cast and multiplied half on the calling thread and half on the helper thread, each on its
own 4 MiB tile, with OpenBLAS on one thread: numpy's cast and BLAS release the GIL. ``decoding(threads=1)`` turns
it off. ``matmul.linear_t`` asks ``is_splitting()`` whether this thread is in such a block.

State: what the process has once: the helper thread, and the BLAS library's thread count, which ``decoding`` blocks
in any thread share (counted under a lock).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from ...errors import UsageError

log = logging.getLogger(__name__)

PARALLEL_MIN_WEIGHTS = 1 << 22  # an int8 matrix this large is cast on two threads at decode (smaller: the hand-off costs more)
PARALLEL_TILE_ELEMENTS = 1 << 20  # 4 MiB of float32 per thread there: a quarter of the calls per matrix of 1 MiB tiles

DEFAULT_DECODE_THREADS = min(2, os.cpu_count() or 1)

_helper: concurrent.futures.ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()
_blas_lock = threading.Lock()
_blas_blocks = 0  # ``decoding`` blocks open in any thread: BLAS is on one thread while there are any
_blas_saved: list[tuple[Any, int]] = []  # each BLAS library and the thread count the first of those blocks found
_split = threading.local()  # .on: this thread is in ``decoding``


def helper_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-decode")
        return _helper


def _blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of every BLAS loaded now (numpy's OpenBLAS; scipy brings its own copy): ~1 ms, so
    looked up when the first ``decoding`` block starts, not per matrix; empty where threadpoolctl finds none."""
    from threadpoolctl import ThreadpoolController

    libraries = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    if not libraries:
        log.info("no BLAS library found to set to one thread: decode casts on one thread")
    return libraries


@contextlib.contextmanager
def decoding(threads: int = DEFAULT_DECODE_THREADS) -> Iterator[None]:
    """Decode on two threads: within the block, on this thread, ``linear`` and ``linear_t`` cast and multiply a large
    int8 matrix (few tokens) half on a helper thread, each thread on its own 4 MiB tile, with BLAS on one thread.

    OpenBLAS's own pool beside our two threads competes with them for the two cores (its waiting threads spin), and
    turning it off and on per matrix made decode erratic, so every loaded BLAS is on one thread while any thread is in
    a ``decoding`` block (process-wide: another thread's BLAS call meanwhile runs on one thread too); the last block
    to end gives back the thread counts the first one found. Without a BLAS library threadpoolctl can set, and with
    ``threads=1``, decode runs on one thread.

    Raises:
        UsageError: ``threads`` is not 1 or 2.
    """
    global _blas_blocks, _blas_saved
    if threads not in (1, 2):
        raise UsageError(f"decode threads must be 1 or 2, got {threads}")
    if threads < 2 or is_splitting():
        yield
        return
    with _blas_lock:
        if _blas_blocks == 0:
            libraries = _blas_libraries()
            _blas_saved = [(library, library.get_num_threads()) for library in libraries]
            _set_blas_threads([(library, 1) for library in libraries])
        splitting = bool(_blas_saved)  # nothing to set: BLAS's own pool would compete with a split
        _blas_blocks += splitting
    if not splitting:
        yield
        return
    _split.on = True
    try:
        yield
    finally:
        _split.on = False
        with _blas_lock:
            _blas_blocks -= 1
            if _blas_blocks == 0:
                _set_blas_threads(_blas_saved)


def _set_blas_threads(settings: list[tuple[Any, int]]) -> None:
    """Set each BLAS library's thread count, always from the one long-lived helper thread: OpenBLAS (0.3.30 and 0.3.31
    here) ignored a count raised from another thread than the one that lowered it while that thread lived, which left
    BLAS on one thread when two ``decoding`` blocks in two threads ended in the other order."""

    def set_all() -> None:
        for library, threads in settings:
            library.set_num_threads(threads)

    if settings:
        helper_thread().submit(set_all).result()


def is_splitting() -> bool:
    """Whether this thread is in a ``decoding`` block that splits large matrices across two threads."""
    return getattr(_split, "on", False)
