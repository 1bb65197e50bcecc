"""A live process's heap: long-lived objects frozen out of garbage collection, a finished call's memory handed back.

Two things make a long-running Python daemon worse over time, and both are
fixed here rather than left to chance:

- The cyclic garbage collector's full collections scan every tracked object,
  and the modules, models and engine alive at start-up are about a quarter of a
  million of them: a full collection then holds the GIL for about 100 ms, a
  stall of several frames in every live stream, at a moment nobody chose.
  :class:`CollectorControl` moves what is alive once the process is ready into
  the collector's permanent generation, which is never scanned again, and
  times every collection.
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
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram


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


def release_heap() -> HeapRelease:
    """Free the reference cycles that are garbage now and return free heap pages to the operating system."""
    started = time.perf_counter()
    unreachable = gc.collect()
    collect_seconds = time.perf_counter() - started
    if _TRIM is not None:
        _TRIM(0)
    return HeapRelease(unreachable, collect_seconds, _TRIM is not None)


class CollectorControl:
    """The garbage collector of a live process: every collection timed, long-lived objects frozen.

    Made at start-up (collections are timed from then on), :meth:`freeze` once
    the process is ready, :meth:`close` when it stops.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.pauses = Histogram(
            "kfgan_gc_pause_seconds",
            "Garbage collections by generation: each holds the GIL, a pause of every stream",
            ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self._registry = registry
        self.frozen_objects = Gauge(
            "kfgan_gc_frozen_objects",
            "Objects alive when the process became ready, exempt from the garbage collector's scans",
            registry=registry,
        )
        # Children made now: ``labels()`` allocates under the metric's lock, and a
        # collection started by that allocation would call back into it and deadlock.
        self._by_generation = [self.pauses.labels(generation=str(generation)) for generation in range(3)]
        self._started = 0.0
        self._frozen = False
        gc.callbacks.append(self._observe)

    def _observe(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)

    def pause_totals(self) -> dict[int, tuple[int, float]]:
        """Collections timed so far: ``{generation: (count, seconds in all)}``."""
        totals = {}
        for generation in range(3):
            labels = {"generation": str(generation)}
            count = self._registry.get_sample_value("kfgan_gc_pause_seconds_count", labels) or 0.0
            seconds = self._registry.get_sample_value("kfgan_gc_pause_seconds_sum", labels) or 0.0
            totals[generation] = (int(count), seconds)
        return totals

    def freeze(self) -> int:
        """Collect, then exempt every object alive now from later collections; returns how many were frozen.

        For once the process has built what it keeps for its lifetime: an object
        frozen here that later becomes garbage inside a reference cycle is not
        freed until :meth:`close`.
        """
        gc.collect()
        gc.freeze()
        self._frozen = True
        count = gc.get_freeze_count()
        self.frozen_objects.set(count)
        return count

    def close(self) -> None:
        """Stop timing collections and give the frozen objects back to the collector (the process may go on)."""
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
            self.frozen_objects.set(0)
        if self._observe in gc.callbacks:
            gc.callbacks.remove(self._observe)
