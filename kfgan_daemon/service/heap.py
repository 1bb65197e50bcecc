"""Handing the heap memory a finished call freed back to the operating system.

A call's decoders, face models' scratch buffers and frames are freed when it
ends, but glibc keeps freed pages in its per-thread arenas, so the resident
size of a long-running daemon only ever grows towards its busiest moment.
``malloc_trim`` returns what is free; elsewhere (musl, macOS) this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util


def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return free heap pages to the operating system; False where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
