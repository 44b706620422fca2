"""Memory freed by reading handed back to the operating system.

Reading a window allocates and frees many short-lived buffers (a part's texts, its Arrow strings and
pieces); Arrow's allocator (mimalloc) and glibc's malloc keep what was freed for reuse, which shows as
resident memory held for nothing once the window's ids are laid out (~0.9 GB at a million rows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import pyarrow as pa


def give_back() -> None:
    """Return freed memory: Arrow's pool's unused pages, then glibc's free heap pages (a no-op elsewhere)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None
