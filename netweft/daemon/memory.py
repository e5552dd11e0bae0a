"""Memory given back to the system after many endpoints are removed.

CPython returns freed objects to glibc's heap, which keeps the pages: after a 1,000-container `rm` the daemon
would stay at its peak. Once removals stop for a moment, a garbage collection and malloc_trim(0) hand the free
pages back (measured by bench/bench_daemon_memory.py). Small removals are not worth a trim.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

QUIET = 1.0        # seconds without removals before trimming: one trim for a whole `rm -f` of thousands
MIN_REMOVED = 16   # endpoints removed since the last trim before one is worth it


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to give back this way
        return None


class Trimmer:
    def __init__(self) -> None:
        self.removed = 0
        self.trims = 0
        self._handle: asyncio.TimerHandle | None = None
        self._trim = _malloc_trim()

    def released(self, count: int = 1) -> None:
        """`count` endpoints were removed; trim once removals pause, if enough of them went."""
        self.removed += count
        if self.removed < MIN_REMOVED or self._trim is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # called outside the daemon's loop (a tool, a test): nothing to schedule on
        if self._handle is not None:
            self._handle.cancel()
        self._handle = loop.call_later(QUIET, self.trim)

    def trim(self) -> None:
        self._handle, self.removed = None, 0
        gc.collect()
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
            log.debug("memory trimmed after endpoint removals")


trimmer = Trimmer()
