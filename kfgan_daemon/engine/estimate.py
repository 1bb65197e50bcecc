"""How long a step will probably take, for deciding whether a frame can still make its deadline.

Estimates steer skipping, and a skipped step is never measured: an estimate
spoiled by one slow call (a lazy model load, a hiccup) would skip that step
forever. So estimates are medians of the last few runs (one outlier does not
move them), and one older than ``probe_interval`` counts as unknown (zero):
the next frame then runs the step, which measures it again.
"""
from __future__ import annotations

import statistics
import time
from collections import deque

WINDOW = 8
PROBE_INTERVAL = 0.5


class RecentDuration:
    """Median of a step's last ``window`` durations in seconds; thread-safe for one writer."""

    def __init__(self, window: int = WINDOW, probe_interval: float = PROBE_INTERVAL) -> None:
        self.probe_interval = probe_interval
        self._samples: deque[float] = deque(maxlen=window)
        self._last = float("-inf")

    def observe(self, seconds: float, now: float | None = None) -> None:
        self._samples.append(seconds)
        self._last = time.monotonic() if now is None else now

    def fresh(self, now: float) -> bool:
        return now - self._last < self.probe_interval

    def predict(self, now: float) -> float:
        samples = list(self._samples)
        if not samples or not self.fresh(now):
            return 0.0
        return statistics.median(samples)


class ServiceTime:
    """The generator's seconds per batch, by batch size.

    A size never seen is predicted from the nearest smaller size seen, scaled
    linearly (a CPU's cost; a GPU does better, so this errs on the safe side),
    or from the nearest larger one as is.
    """

    def __init__(self, window: int = WINDOW, probe_interval: float = PROBE_INTERVAL) -> None:
        self.window = window
        self.probe_interval = probe_interval
        self._sizes: dict[int, deque[float]] = {}
        self._last = float("-inf")

    def observe(self, size: int, seconds: float, now: float | None = None) -> None:
        self._sizes.setdefault(size, deque(maxlen=self.window)).append(seconds)
        self._last = time.monotonic() if now is None else now

    def fresh(self, now: float) -> bool:
        return now - self._last < self.probe_interval

    def predict(self, size: int, now: float) -> float:
        if not self._sizes or not self.fresh(now):
            return 0.0
        if size in self._sizes:
            return statistics.median(self._sizes[size])
        smaller = [k for k in self._sizes if k < size]
        if smaller:
            k = max(smaller)
            return statistics.median(self._sizes[k]) * size / k
        return statistics.median(self._sizes[min(k for k in self._sizes if k > size)])
