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

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Gauge, Histogram

log = logging.getLogger(__name__)


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


# Seconds after a call or feed ended (its codec threads done by then) before its heap is released.
RELEASE_DELAY = 1.0


def release_heap() -> HeapRelease:
    """Free the reference cycles that are garbage now and return free heap pages to the operating system."""
    started = time.perf_counter()
    unreachable = gc.collect()
    collect_seconds = time.perf_counter() - started
    if _TRIM is not None:
        _TRIM(0)
    return HeapRelease(unreachable, collect_seconds, _TRIM is not None)


class HeapReleaser:
    """:func:`release_heap` once a live stream's owner has let it go, off the event loop.

    Called from the event loop: :meth:`schedule` after a call or feed closed
    (several closing together make one release, ``delay`` seconds later), and
    :meth:`close` when the owner stops. ``on_released`` hears each release.
    """

    def __init__(self, on_released: Callable[[HeapRelease], None] | None = None, delay: float = RELEASE_DELAY) -> None:
        self.on_released = on_released
        self.delay = delay
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    def schedule(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._start)

    async def close(self) -> None:
        """Cancel a release not started yet; wait for one under way."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await asyncio.gather(*self._running, return_exceptions=True)

    def _start(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._release())
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _release(self) -> None:
        released = await asyncio.to_thread(release_heap)
        log.debug("heap released: %d unreachable objects collected in %.1f ms", released.unreachable,
                  1000 * released.collect_seconds)
        if self.on_released is not None:
            self.on_released(released)


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
