"""Handing freed memory back to the operating system.

Opening a large shard, scrolling it or building its graph allocates gigabytes in many
blocks that the engine frees when the shard closes; glibc's allocator keeps such freed
blocks for later reuse, so the process's resident memory stays at its peak (a
10^6-item bank read for training left 5 GB resident after it was closed, and an HNSW
build another 8 GB). `malloc_trim` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


def release_freed_memory() -> None:
    """Return the heap's free pages to the system (a no-op where libc cannot)."""
    gc.collect()
    trim = _trim()
    if trim is not None:
        trim(0)
