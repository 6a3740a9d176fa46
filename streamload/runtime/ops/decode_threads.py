"""A decode loop's two threads (``DecodeThreads``, one per run), and BLAS on one thread while any decode splits (``BLAS_THREADS``).

In a decoder's token-by-token loop, a matrix of PARALLEL_MIN_WEIGHTS or more multiplying at most ``DECODE_TOKENS`` rows
of x is cast and multiplied half on the calling thread and half on the run's helper thread, each on its own 4 MiB
tile, with OpenBLAS on one thread: numpy's cast and BLAS release the GIL. ``DecodeThreads(threads=1)`` turns it off.
``matmul.linear`` and ``linear_t`` split when they are handed an open ``DecodeThreads`` (``split=``).

State: a ``DecodeThreads`` belongs to the run that opens it (its helper thread and the helper's cast tile end with
it). What the process has once is the BLAS library's thread count: ``BLAS_THREADS``, the one process-wide object of
the runtime, counts the decodes that need it lowered (why it cannot be per run: ``BlasThreads``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import UsageError
from .matmul import DECODE_TOKENS, CastTiles

logger = logging.getLogger(__name__)

PARALLEL_MIN_WEIGHTS = 1 << 22  # an int8 matrix this large is cast on two threads at decode (smaller: the hand-off costs more)
PARALLEL_TILE_ELEMENTS = 1 << 20  # 4 MiB of float32 per thread there: a quarter of the calls per matrix of 1 MiB tiles
DECODE_CAST_TILE_BYTES = 2 * 4 * PARALLEL_TILE_ELEMENTS  # a splitting decode's two cast tiles (its loop's and its helper's)

DEFAULT_DECODE_THREADS = min(2, os.cpu_count() or 1)


class BlasThreads:
    """The thread count of every loaded BLAS library, lowered to one while any decode splits, then given back.

    Process-wide by nature, so one object (``BLAS_THREADS``) owns it: a process loads each BLAS once (numpy's OpenBLAS;
    scipy brings its own copy) and its thread count is a setting of that library, not of a caller, so it cannot belong
    to a run. Two runs decoding at once share it: it is counted under a lock, lowered when the first one starts (the
    counts it found are saved) and given back when the last one ends, whichever that is. OpenBLAS's own pool beside
    a decode's two threads competes with them for two cores (its waiting threads spin), and turning it off and on per
    matrix made decode erratic, hence one setting for the whole loop; meanwhile another thread's BLAS call runs on one
    thread too.

    Counts are set from this object's one long-lived thread: OpenBLAS (0.3.30 and 0.3.31 here) ignored a count raised
    from another thread than the one that lowered it while that thread lived, which left BLAS on one thread when two
    decodes in two threads ended in the other order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0  # decodes that have BLAS lowered now
        self._saved: list[tuple[Any, int]] = []  # each BLAS library and the thread count the first holder found
        self._setter: concurrent.futures.ThreadPoolExecutor | None = None  # the one thread counts are set from

    def lower(self) -> bool:
        """Put every loaded BLAS on one thread (or count one more holder); False, and nothing to ``restore``, when
        threadpoolctl finds no BLAS it can set."""
        with self._lock:
            if self._holders == 0:
                libraries = _blas_libraries()
                self._saved = [(library, library.get_num_threads()) for library in libraries]
                self._set([(library, 1) for library in libraries])
            if not self._saved:
                return False
            self._holders += 1
            return True

    def restore(self) -> None:
        """One holder fewer (after a ``lower`` that returned True); the last gives back the counts the first found."""
        with self._lock:
            self._holders -= 1
            if self._holders == 0:
                self._set(self._saved)

    def _set(self, settings: list[tuple[Any, int]]) -> None:
        def set_all() -> None:
            for library, threads in settings:
                library.set_num_threads(threads)

        if settings:
            if self._setter is None:
                self._setter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-blas")
            self._setter.submit(set_all).result()


BLAS_THREADS = BlasThreads()  # the process's one BLAS setting (class doc: it cannot be per run)


def _blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of every BLAS loaded now (numpy's OpenBLAS; scipy brings its own copy): ~1 ms, so
    looked up when a decode starts, not per matrix; empty where threadpoolctl finds none."""
    from threadpoolctl import ThreadpoolController

    libraries = list(ThreadpoolController().select(user_api="blas").lib_controllers)
    if not libraries:
        logger.info("no BLAS library found to set to one thread: decode casts on one thread")
    return libraries


class DecodeThreads:
    """One decode loop's split: within ``with DecodeThreads(threads) as split:``, ``linear``/``linear_t`` given
    ``split=split`` cast and multiply a large int8 matrix (few tokens) half on this object's helper thread, each thread
    on its own 4 MiB tile, with BLAS on one thread (``BLAS_THREADS``).

    It belongs to the run that opens it: the helper thread starts when the block opens and is joined when it closes,
    and the helper's cast tile goes with it. Without a BLAS library threadpoolctl can set, and with ``threads=1``,
    nothing splits. One thread at a time multiplies with it (the decode loop's).

    Raises:
        UsageError: ``threads`` is not 1 or 2.
    """

    tile_elements = PARALLEL_TILE_ELEMENTS  # float32 per cast tile when splitting

    def __init__(self, threads: int = DEFAULT_DECODE_THREADS) -> None:
        if threads not in (1, 2):
            raise UsageError(f"decode threads must be 1 or 2, got {threads}")
        self.threads = threads
        self.helper_tiles = CastTiles()  # the helper thread's cast tile
        self._helper: concurrent.futures.ThreadPoolExecutor | None = None
        self._blas_lowered = False

    @property
    def splitting(self) -> bool:
        """Whether large matrices are split across two threads now (inside the block, with BLAS set to one thread)."""
        return self._helper is not None

    def splits(self, tokens: int, weight: np.ndarray) -> bool:
        """Whether this int8 matrix multiplying ``tokens`` rows is cast on two threads (splitting, few tokens, large)."""
        return self._helper is not None and tokens <= DECODE_TOKENS and weight.size >= PARALLEL_MIN_WEIGHTS

    def submit(self, work: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """Run ``work(*args)`` on the helper thread (only while ``splitting``)."""
        assert self._helper is not None, "DecodeThreads.submit outside its block"
        return self._helper.submit(work, *args)

    def __enter__(self) -> DecodeThreads:
        if self.threads == 2:
            self._blas_lowered = BLAS_THREADS.lower()  # nothing to set: BLAS's own pool would compete with a split
        if self._blas_lowered:
            try:
                self._helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streamload-decode")
            except BaseException:
                self.__exit__()  # BLAS given back
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        helper, self._helper = self._helper, None
        if helper is not None:
            helper.shutdown(wait=True)
        self.helper_tiles.release()
        if self._blas_lowered:
            self._blas_lowered = False
            BLAS_THREADS.restore()
