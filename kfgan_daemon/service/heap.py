"""The daemon's heap between calls: long-lived objects frozen, a finished call's memory handed back.

Two things make a long-running Python daemon worse over time, and both are
fixed here rather than left to chance:

- The cyclic garbage collector's full collections scan every tracked object,
  and the modules, models and engine alive at start-up are about a quarter of a
  million of them: a full collection then holds the GIL for about 100 ms, a
  stall of several frames in every live call, at a moment nobody chose.
  :func:`freeze_long_lived` moves what is alive once the daemon is ready into
  the collector's permanent generation, which is never scanned again.
- A call's decoders, face models' scratch buffers and frames are freed when it
  ends, but what sits in reference cycles waits for a full collection, and
  glibc keeps freed pages in its per-thread arenas, so the resident size rises
  and falls by a hundred megabytes with no relation to the calls live.
  :func:`release_heap` collects the cycles and returns free pages
  (``malloc_trim``; elsewhere, musl or macOS, only the collection happens).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Histogram


def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@dataclass(frozen=True)
class HeapRelease:
    """What one :func:`release_heap` did."""

    unreachable: int  # objects in reference cycles the collection found and freed
    collect_seconds: float  # time the collection held the GIL
    trimmed: bool  # False where the C library cannot return free pages


def freeze_long_lived() -> int:
    """Collect, then exempt every object alive now from later collections; returns how many were frozen.

    Call once the process has built what it keeps for its lifetime. An object
    frozen here that later becomes garbage inside a reference cycle is never
    freed, so this is for what lives as long as the process, not for a call.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze_long_lived() -> None:
    """Give what :func:`freeze_long_lived` froze back to the collector (a server stopping in a process that goes on)."""
    gc.unfreeze()


def release_heap() -> HeapRelease:
    """Free the reference cycles that are garbage now and return free heap pages to the operating system."""
    started = time.perf_counter()
    unreachable = gc.collect()
    collect_seconds = time.perf_counter() - started
    if _TRIM is not None:
        _TRIM(0)
    return HeapRelease(unreachable, collect_seconds, _TRIM is not None)


def observe_collections(pauses: Histogram) -> Callable[[], None]:
    """Time every garbage collection into ``pauses`` (labelled by ``generation``); returns what stops it.

    A collection holds the GIL from start to end, so these are pauses of the
    event loop and of every stream's thread alike.
    """
    # Children made now: ``labels()`` allocates under the metric's lock, and a
    # collection started by that allocation would call back into it and deadlock.
    by_generation = [pauses.labels(generation=str(generation)) for generation in range(3)]
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            by_generation[info["generation"]].observe(time.perf_counter() - started[0])

    gc.callbacks.append(callback)
    return lambda: gc.callbacks.remove(callback)
