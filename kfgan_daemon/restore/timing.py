"""Per-stage wall-clock accounting shared by the restorer, the bench and the metrics."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn``, after one unmeasured call (lazy set-up is not speed)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


@dataclass(slots=True)
class StageTotal:
    seconds: float = 0.0
    count: int = 0

    @property
    def mean_ms(self) -> float:
        return 1000.0 * self.seconds / self.count if self.count else 0.0


@dataclass
class StageTimer:
    """Accumulates the time spent in named stages; cheap enough for every frame."""

    totals: dict[str, StageTotal] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        total = self.totals.setdefault(name, StageTotal())
        total.seconds += seconds
        total.count += 1

    def mean_ms(self) -> dict[str, float]:
        return {name: total.mean_ms for name, total in self.totals.items()}
