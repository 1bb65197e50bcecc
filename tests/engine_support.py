"""Test doubles and helpers for the engine tests: a scripted restorer and generators with known timing.

The doubles only stand in for faces and weights, to make the engine's scheduling
observable; the tests that need real faces use the real StreamRestorer.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from kfgan_daemon.engine.machine import MachineLoad
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame

RESTORED_MARK = 255  # luma of pixel (0, 1) in a restored frame
CARRIED_MARK = 128  # ... and in a frame the last correction was carried onto


@dataclass(slots=True)
class ScriptedJob:
    stream: str
    index: int
    crop: np.ndarray

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[1.0, 0.0, self.index], [0.0, 1.0, 0.0]])


@dataclass
class ScriptedRestorer:
    """Every frame has a face; restoring needs a stored keyframe first, exactly like the real restorer.

    ``fail_prepare`` / ``fail_complete``: frame indexes whose step raises. A
    restored frame carries its crop's value in luma pixel (0, 0) and
    ``RESTORED_MARK`` in (0, 1); a carried-forward frame the last restored
    crop's value and ``CARRIED_MARK``. ``matrix`` of a frame is its index.
    """

    name: str = "s"
    prepare_delay: float = 0.0
    fail_prepare: set[int] = field(default_factory=set)
    fail_complete: set[int] = field(default_factory=set)
    store: list[int] = field(default_factory=list)
    prepared: list[int] = field(default_factory=list)
    observed: list[int] = field(default_factory=list)
    passed: list[int] = field(default_factory=list)
    located: list[int] = field(default_factory=list)
    carried: list[tuple[int, int]] = field(default_factory=list)  # (frame index, index of the restored frame)
    remembered: list[int] = field(default_factory=list)  # frames whose crop came too late, kept to carry
    skip_reason: str | None = None
    last_restored: tuple[int, int] | None = None  # (frame index, crop value)
    _threads: set[int] = field(default_factory=set)
    _busy: threading.Lock = field(default_factory=threading.Lock)
    overlapped: bool = False

    def _enter(self) -> None:
        if not self._busy.acquire(blocking=False):
            self.overlapped = True  # two face steps of one stream ran at once
            self._busy.acquire()

    def prepare(self, frame: DecodedFrame) -> ScriptedJob | None:
        self._enter()
        try:
            if self.prepare_delay:
                time.sleep(self.prepare_delay)
            self.prepared.append(frame.index)
            if frame.index in self.fail_prepare:
                raise RuntimeError(f"scripted prepare failure on frame {frame.index}")
            if frame.is_keyframe:
                self.store.append(frame.index)
            if not self.store:
                self.skip_reason = "no_keyframe"
                return None
            self.skip_reason = None
            return ScriptedJob(self.name, frame.index, np.full((8, 8, 3), frame.index % 256, np.uint8))
        finally:
            self._busy.release()

    def locate(self, frame: DecodedFrame) -> np.ndarray:
        self._enter()
        try:
            self.located.append(frame.index)
            if frame.is_keyframe:
                self.store.append(frame.index)
            return np.array([[1.0, 0.0, frame.index], [0.0, 1.0, 0.0]])
        finally:
            self._busy.release()

    def observe_keyframe(self, frame: DecodedFrame) -> None:
        self._enter()
        try:
            if frame.is_keyframe:
                self.observed.append(frame.index)
                self.store.append(frame.index)
        finally:
            self._busy.release()

    def complete(self, frame: DecodedFrame, job: ScriptedJob, restored_crop: np.ndarray) -> DecodedFrame:
        if frame.index in self.fail_complete:
            raise RuntimeError(f"scripted complete failure on frame {frame.index}")
        assert job.index == frame.index
        out = frame.copy()
        out.y[0, 0] = restored_crop[0, 0, 0]
        out.y[0, 1] = RESTORED_MARK
        self.last_restored = (frame.index, int(restored_crop[0, 0, 0]))
        return out

    def carry_forward(self, frame: DecodedFrame, matrix: np.ndarray | None) -> DecodedFrame | None:
        if self.last_restored is None:
            return None
        # the frame's own alignment, or (no time to follow it) an earlier frame's
        assert matrix is None or matrix[0, 2] == frame.index
        restored_index, value = self.last_restored
        self.carried.append((frame.index, restored_index))
        out = frame.copy()
        out.y[0, 0] = value
        out.y[0, 1] = CARRIED_MARK
        return out

    def remember(self, frame: DecodedFrame, job: ScriptedJob, restored_crop: np.ndarray) -> None:
        self.remembered.append(frame.index)
        if self.last_restored is None or self.last_restored[0] < frame.index:
            self.last_restored = (frame.index, int(restored_crop[0, 0, 0]))

    @property
    def can_carry_forward(self) -> bool:
        return self.last_restored is not None

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame:
        self.passed.append(frame.index)
        return frame

    @property
    def needs_keyframe(self) -> bool:
        return not self.store


class TimedGenerator:
    """Restores a batch in ``delay`` seconds (like a GPU) or ``delay`` per job (like a CPU, ``per_job``);
    raises on batches holding a job of the ``poison`` stream."""

    device = "cpu"

    def __init__(self, delay: float = 0.0, per_job: bool = False, poison: str | None = None) -> None:
        self.delay = delay
        self.per_job = per_job
        self.poison = poison
        self.batches: list[list[tuple[str, int]]] = []

    def __call__(self, jobs: Sequence[ScriptedJob]) -> list[np.ndarray]:
        if self.delay:
            time.sleep(self.delay * (len(jobs) if self.per_job else 1))
        if self.poison is not None and any(job.stream == self.poison for job in jobs):
            raise RuntimeError("poisoned batch")
        self.batches.append([(job.stream, job.index) for job in jobs])
        return [255 - job.crop for job in jobs]


def make_frame(index: int, gop: int = 10, size: tuple[int, int] = (32, 48)) -> DecodedFrame:
    height, width = size
    return DecodedFrame(
        y=np.full((height, width), index % 200, np.uint8),
        u=np.full((height // 2, width // 2), 128, np.uint8),
        v=np.full((height // 2, width // 2), 128, np.uint8),
        colour=ColourSpace("bt601", False),
        pts=index * 3600,
        time_base=Fraction(1, 90000),
        is_keyframe=index % gop == 0,
        index=index,
    )


async def feed(stream, count: int, fps: float | None, gop: int = 10, start: int = 0, close: bool = True) -> None:
    """Submit ``count`` frames at ``fps`` (None: as fast as the stream takes them), then close the stream."""
    period = None if fps is None else 1.0 / fps
    begin = time.monotonic()
    for i in range(start, start + count):
        if period is not None:
            delay = begin + (i - start) * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await stream.submit(make_frame(i, gop))
    if close:
        await stream.close()


async def collect(stream) -> list:
    return [out async for out in stream.results()]


def quiet_machine(cores: float = 2.0) -> MachineLoad:
    """A machine where no other program runs, whatever else the test machine is doing: the planner
    then plans from this process's own costs only (the doubles' sleeps cost no CPU)."""
    return MachineLoad(cores, read_busy=lambda: None)
