"""One stream's counts: each frame's outcome and each stage's time taken once, and read by everything that reports.

Every event of a live stream (a frame received, a frame leaving with its
outcome, a stage's duration, an error, a missed deadline, a frame the consumer
did not read in time) is one call on :class:`StreamCounts`, which updates the
stream's :class:`StreamStats`, its Prometheus series (``engine.metrics``) and
the recent histories together. ``LiveStream.stats``, ``stage_ms()``,
``info()`` (GET /streams/{id}), the pipe's summary and the live bench read
from here, and so do the stream's deadline decisions (:meth:`StreamCounts.expected`):
nothing else in the engine counts a stream's frames, so the numbers they show
cannot drift apart.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from kfgan_daemon.engine.estimate import RecentDuration
from kfgan_daemon.engine.output import Outcome, StreamOutput

if TYPE_CHECKING:
    from kfgan_daemon.engine.metrics import EngineMetrics
    from kfgan_daemon.engine.planner import CadencePlanner

FPS_WINDOW = 1.0
LATENCY_HISTORY = 1024
STAGE_HISTORY = 512
# the CPU stages whose recent durations decide whether a frame can still make its deadline
PREDICTED_STAGES = ("prepare", "locate", "complete", "carry_forward")


@dataclass(slots=True)
class StreamStats:
    received: int = 0
    emitted: int = 0
    restored: int = 0
    carried_forward: int = 0
    no_face: int = 0
    no_keyframe: int = 0
    shed: int = 0
    dropped: int = 0  # overload with policy "drop": never sent
    errors: int = 0
    keyframes: int = 0
    deadline_misses: int = 0
    output_overflow: int = 0


_OUTCOME_COUNTERS: dict[Outcome, str | None] = {
    Outcome.RESTORED: "restored",
    Outcome.CARRIED_FORWARD: "carried_forward",
    Outcome.NO_FACE: "no_face",
    Outcome.NO_KEYFRAME: "no_keyframe",
    Outcome.SHED: "shed",
    Outcome.ERROR: None,  # counted where the exception was caught (StreamCounts.error)
}


class StageHistory:
    """Each stage's recent durations in seconds: added by the face and paste threads, read on the event loop."""

    def __init__(self, size: int = STAGE_HISTORY) -> None:
        self._size = size
        self._stages: dict[str, deque[float]] = {}
        # The event loop reads the stages (GET /streams/ID) while threads add them:
        # a new stage's key arriving mid-read made the read fail.
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            history = self._stages.get(stage)
            if history is None:
                history = self._stages[stage] = deque(maxlen=self._size)
            history.append(seconds)

    def histories(self) -> dict[str, list[float]]:
        """A copy of every stage's recent durations (seconds), taken as one consistent read."""
        with self._lock:
            return {stage: list(history) for stage, history in self._stages.items()}


class StreamCounts:
    """Every count and timing of one stream, each taken once (see the module's docstring).

    Called on the event loop, except :meth:`stage`, which the face and paste
    threads call too. ``planner``: a real-time stream's plan, which learns the
    CPU seconds of each stage and whose share of the stream is reported.
    """

    def __init__(self, stream_id: str, metrics: EngineMetrics, planner: CadencePlanner | None = None) -> None:
        self.id = stream_id
        self.stats = StreamStats()
        self._metrics = metrics
        self._planner = planner
        self._stages = StageHistory()
        self._latencies: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self._emitted_at: deque[float] = deque()
        self._typical = {stage: RecentDuration() for stage in PREDICTED_STAGES}

    # ---- events -------------------------------------------------------------

    def received(self, keyframe: bool) -> None:
        self.stats.received += 1
        self._metrics.frames_received.labels(self.id).inc()
        if keyframe:
            self.stats.keyframes += 1
            self._metrics.keyframes.labels(self.id).inc()

    def emitted(self, output: StreamOutput) -> None:
        """A frame leaves the stream: stamps ``output.emitted`` and counts its outcome and latency."""
        now = time.monotonic()
        output.emitted = now
        self.stats.emitted += 1
        field_name = _OUTCOME_COUNTERS[output.outcome]
        if field_name is not None:
            setattr(self.stats, field_name, getattr(self.stats, field_name) + 1)
        self._metrics.frames.labels(self.id, output.outcome.value).inc()
        self.stage("total", output.latency)
        self._latencies.append(output.latency)
        self._emitted_at.append(now)
        self._metrics.fps.labels(self.id).set(self._fps(now))
        if self._planner is not None:
            self._metrics.restored_share.labels(self.id).set(self._planner.share(self.id))
            self._metrics.plan_rate.set(self._planner.rate)

    def dropped(self) -> None:
        """A frame not sent at all (overload with policy ``drop``)."""
        self.stats.dropped += 1
        self._metrics.frames.labels(self.id, "dropped").inc()

    def deadline_missed(self) -> None:
        self.stats.deadline_misses += 1
        self._metrics.deadline_misses.labels(self.id).inc()

    def overflowed(self) -> None:
        """A finished frame discarded because the consumer did not read it in time."""
        self.stats.output_overflow += 1
        self._metrics.output_overflow.labels(self.id).inc()

    def error(self, stage: str) -> None:
        self.stats.errors += 1
        self._metrics.errors.labels(self.id, stage).inc()

    def stage(self, stage: str, seconds: float, cpu_seconds: float | None = None) -> None:
        """One run of a stage took ``seconds`` (wall clock); ``cpu_seconds``, when measured, go to the plan."""
        self._metrics.stage_seconds.labels(self.id, stage).observe(seconds)
        self._stages.add(stage, seconds)
        typical = self._typical.get(stage)
        if typical is not None:
            typical.observe(seconds)
        if cpu_seconds is not None and self._planner is not None:
            self._planner.observe_stage(self.id, stage, cpu_seconds)

    def queues(self, depths: dict[str, int]) -> None:
        for name, depth in depths.items():
            self._metrics.queue_depth.labels(self.id, name).set(depth)

    # ---- reads --------------------------------------------------------------

    def expected(self, stage: str, now: float) -> float:
        """Seconds one of ``PREDICTED_STAGES`` will probably take (0 while unknown, see ``engine.estimate``)."""
        return self._typical[stage].predict(now)

    def snapshot(self) -> StreamStats:
        return replace(self.stats)

    @property
    def fps(self) -> float:
        return self._fps(time.monotonic())

    def latency_quantiles(self, *quantiles: float) -> list[float | None]:
        """Quantiles (0..1) of the added latency in seconds over the last frames; None before any frame."""
        values = list(self._latencies)
        if not values:
            return [None for _ in quantiles]
        return [float(np.quantile(values, q)) for q in quantiles]

    def stage_ms(self) -> dict[str, float]:
        """Median milliseconds of each stage over the last frames (prepare, inference, complete, total...)."""
        return {stage: 1000 * float(np.median(history)) for stage, history in self._stages.histories().items() if history}

    def _fps(self, now: float) -> float:
        emitted_at = self._emitted_at
        while emitted_at and now - emitted_at[0] > FPS_WINDOW:
            emitted_at.popleft()
        return len(emitted_at) / FPS_WINDOW
