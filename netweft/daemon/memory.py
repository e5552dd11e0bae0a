"""A small daemon: code loaded only where it is used, and memory given back after many endpoints are removed.

Every module a daemon imports costs it memory for as long as it runs (≈50-100 KiB each, code and all):
`lazy_module` gives a module object whose code runs on its first attribute access, so a worker never loads
the manager's code, nor a manager the etcd client it does not use.

CPython returns freed objects to glibc's heap, which keeps the pages: after a 1,000-container `rm` the daemon
would stay at its peak, and a burst of creations leaves behind the free space of its passing buffers (≈7 MiB
after 200 containers). Once removals or creations stop for a moment, a garbage collection and malloc_trim(0)
hand the free pages back (measured by bench/bench_daemon_memory.py). A few are not worth a trim.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import importlib.util
import logging
import sys
from types import ModuleType

log = logging.getLogger(__name__)

M_ARENA_MAX = -8   # mallopt(3)
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
MMAP_THRESHOLD = 64 * 1024   # blocks this large come from mmap and go back to the kernel when freed
TRIM_THRESHOLD = 256 * 1024  # free space at the heap's top beyond this is given back at once
TLS_BUFFER = 32 * 1024       # a TLS connection's read buffer (asyncio's is 256 KiB, touched, per connection)
QUIET = 1.0        # seconds without removals before trimming: one trim for a whole `rm -f` of thousands
MIN_REMOVED = 16   # endpoints made or removed since the last trim before one is worth it
SETTLE = 1.0       # seconds after start-up (the store read, the first watch snapshot) for one trim


def lazy_module(name: str) -> ModuleType:
    """Module `name`, loaded on its first attribute access (at once if it is loaded already)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)   # only arms the load: the module's code runs on first use
    return module


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim   # the process's own libc (ctypes.util would load tempfile, shutil)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to give back this way
        return None


def tune_malloc() -> None:
    """glibc malloc for a long-running daemon whose load comes in bursts. Call before any thread starts.

    One arena for the whole process: each thread that allocates (the kernel thread: pyroute2, nftables) otherwise
    gets an arena of its own, a few MiB that are never given back; the GIL serialises the allocations anyway.
    Fixed mmap and trim thresholds: glibc raises its mmap threshold to the size of the largest block freed (up to
    32 MiB), so after one large transient buffer (a saved copy of the overlay state, a watch snapshot) every
    later one is carved from the heap and leaves a hole there that no trim reaches."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_ARENA_MAX, 1)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its allocator has its own rules
        pass


def small_tls_buffers() -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer, zero-filled (all of it resident) for as long as
    the connection lives: a worker keeps a few to its managers (watch, calls in flight). A TLS record is at
    most 16 KiB; 32 KiB reads take any of them whole."""
    import asyncio.sslproto
    if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_BUFFER:
        asyncio.sslproto.SSLProtocol.max_size = TLS_BUFFER


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

    def attached(self, count: int = 1) -> None:
        """`count` endpoints were made: a burst of them leaves free heap behind, trimmed as after removals."""
        self.released(count)

    def trim(self) -> None:
        self._handle, self.removed = None, 0
        gc.collect()
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
            log.debug("memory trimmed after endpoint removals")


trimmer = Trimmer()
