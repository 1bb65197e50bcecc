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

from kfgan_daemon.media.frame import DecodedFrame


@dataclass(slots=True)
class ScriptedJob:
    stream: str
    index: int
    crop: np.ndarray


@dataclass
class ScriptedRestorer:
    """Every frame has a face; restoring needs a stored keyframe first, exactly like the real restorer.

    ``fail_prepare`` / ``fail_complete``: frame indexes whose step raises.
    """

    name: str = "s"
    prepare_delay: float = 0.0
    fail_prepare: set[int] = field(default_factory=set)
    fail_complete: set[int] = field(default_factory=set)
    store: list[int] = field(default_factory=list)
    prepared: list[int] = field(default_factory=list)
    observed: list[int] = field(default_factory=list)
    passed: list[int] = field(default_factory=list)
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
                return None
            return ScriptedJob(self.name, frame.index, np.full((8, 8, 3), frame.index % 256, np.uint8))
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
        image = frame.image.copy()
        image[0, 0] = restored_crop[0, 0]
        image[0, 1] = 255  # marks the frame as restored
        return frame.with_image(image)

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
    image = np.full((*size, 3), index % 200, np.uint8)
    return DecodedFrame(image, pts=index * 3600, time_base=Fraction(1, 90000), is_keyframe=index % gop == 0, index=index)


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
