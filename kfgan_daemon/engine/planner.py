"""Which live frames are restored: a cadence planned from measured costs, fair across streams.

Judging each frame alone (will this one make its deadline?) is all or nothing:
on a machine a little too slow every frame looks late and is shed while a core
sits idle, on one a little faster every frame is restored. The planner decides
a *rate* instead: how many crops per second the machine can restore while
keeping ``target_busy`` of its usable cores busy and its frames on time. It
shares that rate among the streams by max-min fairness (water-filling: no
stream gets more than its frame rate, and what one cannot use goes to the
others) and turns each stream's share into a regular subset of its frames with
a credit counter: a share of 0.4 restores two frames in five, evenly spaced.
The frames in between get the last correction carried forward.

The rate comes from a model, trimmed by feedback:

- the model: CPU seconds per frame that every frame costs (decode, encode,
  carrying the correction: this process's CPU time less what restoration
  took), CPU seconds a restoration adds (face stage, paste, generator), the
  generator's wall time per crop (one inference thread), and the cores left
  by other programs on the machine (``engine.machine``). Until streams have
  run, priors scaled from the generator's speed measured at warm-up stand in;
- the feedback: planned restorations that still missed their deadline (the
  machine slowed, a hiccup), judged over the last two seconds, shrink the
  rate; clean periods let it grow back slowly.

The same numbers give the capacity: how many streams like the ones open (or,
before any, like ``capacity_reference``) fit at the acceptable cadence
(``min_restored_share``), with a margin in hand; streams are admitted one at a
time, each once the previous one's real cost is measured. Everything here is
synchronous and takes its clock and machine as arguments, so tests drive it
with scripted costs.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kfgan_daemon.engine.machine import LoadSample, MachineLoad
from kfgan_daemon.engine.settings import EngineSettings

log = logging.getLogger(__name__)

# Crops per second every open stream is planned at least, however loaded the machine:
# a stream that was admitted gets restored frames, never none.
RATE_FLOOR = 1.0
# A stream's credit never holds more than this many restorations in hand: after a
# stall it resumes its cadence instead of restoring a burst of frames.
MAX_CREDIT = 2.0
# The inference thread is one thread: planned at most this busy, so that a crop
# rarely waits behind another stream's.
GENERATOR_TARGET = 0.9
# Feedback on the rate, judged over the last LATE_WINDOW planning periods (a period
# holds a handful of restorations, too few to judge alone): more than LATE_SHARE_HIGH
# of the chosen frames late, and at least MIN_LATE of them, cuts the trim by CUT;
# under LATE_SHARE_LOW raises it by GROW, past 1 (more than the model says) only
# while cores and generator are measurably idle.
LATE_WINDOW = 4
LATE_SHARE_HIGH = 0.2
LATE_SHARE_LOW = 0.05
MIN_LATE = 2
CUT = 0.8
GROW = 0.05
TRIM_RANGE = (0.2, 1.3)
# Priors, as multiples of the generator's seconds per crop (measured at warm-up),
# from the costs measured on the 2-core machines of the project (bench s18 at 720p:
# generator 21-34 ms; decode, encode and carry 19-30 ms per frame; face stage and
# paste of a restored frame 15-25 ms): what every frame costs per megapixel, and
# what a restoration adds on top of the generator.
PRIOR_BASE_PER_MEGAPIXEL = 1.0
PRIOR_RESTORE_EXTRA = 0.7
# Seconds per crop assumed for the capacity of an engine whose generator was never timed.
DEFAULT_GENERATOR_SECONDS = 0.03
# The per-frame CPU cost is the BASE_QUANTILE of the last BASE_WINDOW periods' measurements.
BASE_WINDOW = 8
BASE_QUANTILE = 0.25
# A stream's costs are known once it ran this many planning periods; until then the
# engine admits no other stream (each one's real cost may be far from the priors).
SETTLE_PERIODS = 3
# Capacity keeps this share of what the estimate says fits: a caller adds more than its own
# stream (its peer may share the machine, its first seconds cost more), and one stream too many
# starves every call of restorations, where one too few only sends a caller elsewhere.
ADMISSION_MARGIN = 0.85
# Capacity is the lowest estimate of the last ESTIMATE_WINDOW planning periods.
ESTIMATE_WINDOW = 6
# Fewer frames than this in a planning period say too little about the per-frame cost.
MIN_FRAMES_TO_MEASURE = 10

Limit = Literal["none", "generator", "cpu", "shared_cpu", "deadline"]

_REASONS: dict[Limit, str] = {
    "none": "every frame is restored: the machine keeps up",
    "generator": "the generator restores as many faces per second as it can; the others carry the last one",
    "cpu": "the processor is fully planned; the frames between restored ones carry the last restoration",
    "shared_cpu": "other programs use part of the processor; fewer frames are restored, the others carry the last one",
    "deadline": "restored frames were arriving late, so fewer are restored for now",
}


class Ewma:
    """An exponentially weighted mean: recent costs count most, one outlier moves it a little."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.alpha * (sample - self.value)

    def get(self, default: float) -> float:
        return default if self.value is None else self.value


@dataclass(frozen=True, slots=True)
class StreamPlanInfo:
    """One stream's plan, for the admin API and the demo page."""

    restored_share: float  # of its frames, planned
    cadence: float  # frames per restored frame (1: every frame)
    limited_by: Limit
    reason: str


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """The whole plan at one moment, for reports beside live figures."""

    restorations_per_second: float
    frames_per_second: float
    limited_by: Limit
    trim: float
    other_programs_cores: float  # what other programs on the machine used, as last measured
    cores: float  # what this process may use
    capacity: int

    def describe(self) -> str:
        share = self.restorations_per_second / self.frames_per_second if self.frames_per_second else 1.0
        return (
            f"{self.restorations_per_second:.1f} restorations/s for {self.frames_per_second:.1f} frames/s "
            f"({100 * share:.0f}%, limited by {self.limited_by}, trim {self.trim:.2f}); other programs used "
            f"{self.other_programs_cores:.2f} of {self.cores:g} cores; capacity {self.capacity} stream(s) like these"
        )


class StreamPlan:
    """One stream's part of the plan: its frame rate, its share of restored frames, and the credit
    that spaces them evenly."""

    __slots__ = (
        "id", "interval", "last_arrival", "pixels", "share", "credit", "stage_cpu", "chosen", "late", "frames", "periods"
    )

    def __init__(self, stream_id: str) -> None:
        self.id = stream_id
        self.interval = Ewma(0.1)  # seconds between frames
        self.last_arrival: float | None = None
        self.pixels = 0
        self.share = 1.0
        self.credit = 1.0  # the first restorable frame is restored
        self.stage_cpu: dict[str, Ewma] = {}
        self.chosen = 0  # restorations started in the current period
        self.late = 0  # ... of which missed their deadline
        self.frames = 0  # frames arrived in the current period
        self.periods = 0  # planning periods in which its frames were measured

    @property
    def fps(self) -> float:
        interval = self.interval.value
        return 25.0 if interval is None else 1.0 / interval

    def arrived(self, now: float, pixels: int) -> None:
        if self.last_arrival is not None and now > self.last_arrival:
            # a pause (a muted camera) is not a frame rate
            self.interval.add(min(max(now - self.last_arrival, 1.0 / 120), 1.0))
        self.last_arrival = now
        self.pixels = pixels
        self.frames += 1

    def take_turn(self) -> bool:
        """One more frame of this stream: True when it is its turn to be restored."""
        self.credit = min(self.credit + self.share, MAX_CREDIT)
        if self.credit >= 1.0:
            self.credit -= 1.0
            return True
        return False

    def cpu(self, stage: str) -> float | None:
        estimate = self.stage_cpu.get(stage)
        return None if estimate is None else estimate.value


class CadencePlanner:
    """Plans every live stream's restored share from what the machine measurably does.

    The engine calls :meth:`arrived` for every frame, :meth:`take_turn` before
    it starts a frame's restoration, :meth:`observe_stage` and
    :meth:`observe_batch` with measured costs, and :meth:`late` when a chosen
    frame's restoration missed its deadline. Thread-safe: costs arrive from worker threads.
    """

    def __init__(
        self,
        settings: EngineSettings,
        machine: MachineLoad | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.machine = machine or MachineLoad()
        self._clock = clock
        self._lock = threading.Lock()
        self._streams: dict[str, StreamPlan] = {}
        self._generator_wall: dict[int, Ewma] = {}  # seconds per batch, by batch size
        self._generator_cpu = Ewma()  # CPU seconds per crop
        self._generator_prior: float | None = None
        # CPU seconds every frame costs, restored or not, as measured in the last planning periods
        self._base_cpu: deque[float] = deque(maxlen=BASE_WINDOW)
        self._others = Ewma(0.3)  # cores other programs use
        self._restoration_cpu = 0.0  # CPU seconds spent restoring in the current period
        self._generator_busy = 0.0  # wall seconds the generator ran in the current period
        self._estimates: deque[int] = deque(maxlen=ESTIMATE_WINDOW)  # capacity, as of the last periods
        # (chosen, late) restorations of the last planning periods
        self._outcomes: deque[tuple[int, int]] = deque(maxlen=LATE_WINDOW)
        self.rate = 0.0  # crops per second planned over all streams
        self.trim = 1.0
        self.limited_by: Limit = "none"
        self._period_start = clock()
        self.machine.sample()

    # ---- streams ------------------------------------------------------------

    def add_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams[stream_id] = StreamPlan(stream_id)
            self._replan_locked(self._clock(), measure=False)

    def remove_stream(self, stream_id: str) -> None:
        with self._lock:
            self._streams.pop(stream_id, None)
            self._replan_locked(self._clock(), measure=False)

    def arrived(self, stream_id: str, now: float, pixels: int) -> None:
        """A frame of ``stream_id`` arrived at ``now`` (time.monotonic())."""
        with self._lock:
            plan = self._streams.get(stream_id)
            if plan is not None:
                plan.arrived(now, pixels)

    # ---- decisions ------------------------------------------------------------

    def take_turn(self, stream_id: str) -> bool:
        """Whether this frame of ``stream_id`` is one of its planned restorations (replans when due)."""
        with self._lock:
            now = self._clock()
            if now - self._period_start >= self.settings.plan_interval:
                self._replan_locked(now, measure=True)
            plan = self._streams.get(stream_id)
            if plan is None:
                return True
            if plan.take_turn():
                plan.chosen += 1
                return True
            return False

    def give_back(self, stream_id: str) -> None:
        """A planned restoration could not start in time (the generator busy with another stream's
        face, a slow face stage): the stream keeps the turn for its next frame. Not lateness: nothing
        was spent, and the credit's cap keeps deferred turns from piling up."""
        with self._lock:
            plan = self._streams.get(stream_id)
            if plan is not None:
                plan.credit = min(plan.credit + 1.0, MAX_CREDIT)
                plan.chosen -= 1

    def spend(self, stream_id: str) -> None:
        """A restoration outside the plan (nothing to carry yet, so the frame is restored if it can be)."""
        with self._lock:
            plan = self._streams.get(stream_id)
            if plan is not None:
                plan.credit = max(plan.credit - 1.0, -1.0)
                plan.chosen += 1

    def late(self, stream_id: str) -> None:
        """A planned restoration was started and came too late for its frame: the rate was too high."""
        with self._lock:
            plan = self._streams.get(stream_id)
            if plan is not None:
                plan.late += 1

    # ---- measurements -----------------------------------------------------------

    def set_generator_prior(self, seconds_per_crop: float) -> None:
        """The generator's seconds per crop measured at warm-up: the scale of every prior."""
        with self._lock:
            self._generator_prior = seconds_per_crop

    def observe_stage(self, stream_id: str, stage: str, cpu_seconds: float) -> None:
        """CPU seconds (the thread's own) one face or paste stage of ``stream_id`` took."""
        with self._lock:
            plan = self._streams.get(stream_id)
            if plan is not None:
                plan.stage_cpu.setdefault(stage, Ewma()).add(cpu_seconds)
            if stage in _RESTORATION_STAGES:
                self._restoration_cpu += cpu_seconds

    def observe_batch(self, size: int, wall_seconds: float, cpu_seconds: float) -> None:
        """One generator call: ``size`` crops in ``wall_seconds`` (``cpu_seconds`` of the inference thread)."""
        if size < 1:
            return
        with self._lock:
            self._generator_wall.setdefault(size, Ewma()).add(wall_seconds)
            self._generator_cpu.add(cpu_seconds / size)
            self._restoration_cpu += cpu_seconds
            self._generator_busy += wall_seconds

    # ---- what the plan says ----------------------------------------------------------

    def share(self, stream_id: str) -> float:
        with self._lock:
            plan = self._streams.get(stream_id)
            return 1.0 if plan is None else plan.share

    def stream_info(self, stream_id: str) -> StreamPlanInfo:
        with self._lock:
            plan = self._streams.get(stream_id)
            share = 1.0 if plan is None else plan.share
            limited_by: Limit = "none" if share >= 0.999 else self.limited_by
            return StreamPlanInfo(share, 1.0 / max(share, 1e-6), limited_by, _REASONS[limited_by])

    def summary(self) -> PlanSummary:
        with self._lock:
            return PlanSummary(
                self.rate,
                sum(plan.fps for plan in self._streams.values()),
                self.limited_by,
                self.trim,
                self._others.get(0.0),
                self.machine.cores,
                self._capacity_locked(),
            )

    def capacity(self) -> int:
        """Streams this engine can serve at ``min_restored_share`` (at least 1), from the open streams'
        measured costs, or before any from the priors for a ``capacity_reference`` stream."""
        with self._lock:
            return self._capacity_locked()

    def capacity_in_use(self) -> float:
        """Open streams over :meth:`capacity` (1: full; more: opened beyond it, by an explicit limit)."""
        with self._lock:
            return len(self._streams) / self._capacity_locked()

    # ---- planning ----------------------------------------------------------------------

    def _replan_locked(self, now: float, measure: bool) -> None:
        streams = list(self._streams.values())
        if measure:
            sample = self.machine.sample()
            if sample is not None:
                self._learn(sample, streams)
            self._adjust_trim(streams, sample)
            self._period_start = now
            for plan in streams:
                plan.periods += plan.frames >= MIN_FRAMES_TO_MEASURE // 2
                plan.chosen = plan.late = plan.frames = 0
            self._restoration_cpu = 0.0
            self._generator_busy = 0.0
            if streams:
                self._estimates.append(self._estimate_locked(streams))
            else:
                self._estimates.clear()
        if not streams:
            self.rate = 0.0
            self.limited_by = "none"
            return
        total_fps = sum(plan.fps for plan in streams)
        cpu_rate, generator_rate = self._rates(streams, total_fps)
        rate = min(cpu_rate, generator_rate) * self.trim
        floor = RATE_FLOOR * len(streams)
        self.rate = min(total_fps, max(floor, rate))
        if self.rate >= total_fps * 0.999:
            self.limited_by = "none"
        elif self.trim < 0.95:
            self.limited_by = "deadline"
        elif generator_rate < cpu_rate:
            self.limited_by = "generator"
        else:
            self.limited_by = "shared_cpu" if self._others.get(0.0) > 0.25 else "cpu"
        for plan, share in zip(streams, _water_fill([plan.fps for plan in streams], self.rate), strict=True):
            plan.share = share
        if measure:
            log.debug(
                "plan: %.1f crops/s of %.1f frames/s (%s; cpu %.1f, generator %.1f, trim %.2f; other programs "
                "%.2f cores, every frame %.1f ms CPU)",
                self.rate, total_fps, self.limited_by, cpu_rate, generator_rate, self.trim,
                self._others.get(0.0), 1000 * self._base_cost(0),
            )

    def _learn(self, sample: LoadSample, streams: list[StreamPlan]) -> None:
        self._others.add(sample.others)
        frames = sum(plan.frames for plan in streams)
        if frames >= MIN_FRAMES_TO_MEASURE:
            process_cpu = sample.process * sample.seconds
            self._base_cpu.append(max(0.0, process_cpu - self._restoration_cpu) / frames)

    def _adjust_trim(self, streams: list[StreamPlan], sample: LoadSample | None) -> None:
        self._outcomes.append((sum(plan.chosen for plan in streams), sum(plan.late for plan in streams)))
        chosen = sum(count for count, _ in self._outcomes)
        late = sum(count for _, count in self._outcomes)
        low, high = TRIM_RANGE
        if late >= MIN_LATE and late > LATE_SHARE_HIGH * chosen:
            self.trim = max(low, self.trim * CUT)
            self._outcomes.clear()  # judge the cut rate on its own periods
        elif late <= LATE_SHARE_LOW * chosen:
            idle = sample is not None and (
                sample.process + sample.others < 0.9 * self.machine.cores * self.settings.target_busy
                and self._generator_busy < 0.9 * GENERATOR_TARGET * sample.seconds
            )
            if idle:
                self.trim = min(high, self.trim + GROW)
            elif self.trim < 1.0:
                self.trim = min(1.0, self.trim + GROW)
            else:  # beyond the model while the machine is busy: back to it
                self.trim = max(1.0, self.trim - GROW)

    def _rates(self, streams: list[StreamPlan], total_fps: float) -> tuple[float, float]:
        """Crops per second the processor and the generator can each afford with these streams
        (infinite before anything was measured: every frame is tried, and measured)."""
        if not self._generator_wall and self._generator_prior is None:
            return math.inf, math.inf
        per_crop = self._generator_seconds(min(len(streams), self.settings.max_batch))
        available = self._available_cores()
        every_frame = sum(plan.fps * self._base_cost(plan.pixels) for plan in streams)
        extra = sum(plan.fps * self._restore_extra(plan) for plan in streams) / max(total_fps, 1e-9)
        cpu_rate = max(0.0, available - every_frame) / max(extra, 1e-6)
        generator_rate = GENERATOR_TARGET / max(per_crop, 1e-6)
        return cpu_rate, generator_rate

    def _generator_seconds(self, batch: int = 1) -> float:
        """Wall seconds per crop in a batch of ``batch`` (streams' crops batch together when they come
        at once). A size never run is scaled from the nearest smaller one as if the cost grew with the
        batch, as on a CPU (a GPU does better: then the estimate errs on the safe side)."""
        measured = {size: estimate.value for size, estimate in self._generator_wall.items() if estimate.value is not None}
        if measured:
            smaller = [size for size in measured if size <= batch]
            size = max(smaller) if smaller else min(measured)
            return measured[size] / size
        return self._generator_prior if self._generator_prior is not None else DEFAULT_GENERATOR_SECONDS

    def _available_cores(self) -> float:
        return max(0.0, self.machine.cores * self.settings.target_busy - self._others.get(0.0))

    def _base_cost(self, pixels: int) -> float:
        """CPU seconds every frame costs, restored or not (measured, else the prior for its size)."""
        prior = PRIOR_BASE_PER_MEGAPIXEL * self._generator_seconds() * max(pixels, 1) / 1e6
        if not self._base_cpu:
            return prior
        # A low quantile: what a call's first seconds add (decoders and encoders starting, first
        # detections) and other one-off work in this process only ever raise a period's figure.
        return float(np.quantile(self._base_cpu, BASE_QUANTILE))

    def _restore_extra(self, plan: StreamPlan | None) -> float:
        """CPU seconds a restoration adds to a frame: face stage, paste and generator, less the carry it saves."""
        generator = self._generator_cpu.get(self._generator_seconds())
        prior = generator * (1.0 + PRIOR_RESTORE_EXTRA)
        if plan is None:
            return prior
        prepare, complete = plan.cpu("prepare"), plan.cpu("complete")
        if prepare is None or complete is None:
            return prior
        saved = (plan.cpu("carry_forward") or 0.0) + (plan.cpu("locate") or 0.0)
        return max(generator, prepare + complete + generator - saved)

    def _capacity_locked(self) -> int:
        """The streams that fit; while the newest stream is not yet measured, no more than are open: callers
        who come at once are admitted one by one, each once the last one's real cost is known."""
        streams = list(self._streams.values())
        if not streams:
            self._sample_idle_machine()
        # The lowest of the recent estimates: a calm moment in a busy call must not admit one too many.
        estimate = min([self._estimate_locked(streams), *(self._estimates if streams else ())])
        if any(plan.periods < SETTLE_PERIODS for plan in streams):
            return min(estimate, len(streams))
        return estimate

    def _sample_idle_machine(self) -> None:
        """With no stream to plan, still follow what other programs use (a browser opened on the box)."""
        now = self._clock()
        if now - self._period_start >= self.settings.plan_interval:
            sample = self.machine.sample()
            if sample is not None:
                self._others.add(sample.others)
            self._period_start = now

    def _estimate_locked(self, streams: list[StreamPlan]) -> int:
        measured = [plan for plan in streams if plan.interval.value is not None]
        if measured:
            fps = sum(plan.fps for plan in measured) / len(measured)
            base = sum(self._base_cost(plan.pixels) for plan in measured) / len(measured)
            extra = sum(self._restore_extra(plan) for plan in measured) / len(measured)
        else:
            width, height, fps = self.settings.capacity_reference
            base = self._base_cost(width * height)
            extra = self._restore_extra(None)
        share = self.settings.min_restored_share
        per_stream = fps * (base + share * extra)
        by_cpu = self._available_cores() / max(per_stream, 1e-9)
        batch = min(max(1, len(streams)), self.settings.max_batch)
        by_generator = GENERATOR_TARGET / max(fps * share * self._generator_seconds(batch), 1e-9)
        return max(1, math.floor(ADMISSION_MARGIN * min(by_cpu, by_generator)))


_RESTORATION_STAGES = frozenset({"prepare", "complete"})


def _water_fill(demands: list[float], total: float) -> list[float]:
    """Max-min fair shares: each stream gets ``min(demand, level)`` of ``total``, as fractions of its demand."""
    shares = [0.0] * len(demands)
    remaining = total
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for position, index in enumerate(order):
        level = remaining / (len(order) - position)
        granted = min(demands[index], level)
        remaining -= granted
        shares[index] = 1.0 if demands[index] <= 0 else min(1.0, granted / demands[index])
    return shares
