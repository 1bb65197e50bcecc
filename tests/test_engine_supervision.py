"""The inference worker under supervision: late jobs of several streams, failing batches, a killed worker.

Real FaceJobs (numpy arrays, as the restorer builds them) go through a real
lite generator; only the arrays' contents are random.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from kfgan_daemon.engine import EngineMetrics, InferenceWorker
from kfgan_daemon.errors import EngineError
from kfgan_daemon.logthrottle import ThrottledLog
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.job import FaceJob

pytestmark = pytest.mark.timeout(60)


def face_job(seed: int) -> FaceJob:
    rng = np.random.default_rng(seed)
    crop = lambda: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # noqa: E731
    return FaceJob(crop(), crop(), crop(), np.eye(2, 3), rng.random((68, 2)) * 256, key_id=0)


@pytest.fixture(scope="module")
def generator() -> CropGenerator:
    torch.manual_seed(0)
    return CropGenerator(LiteGenerator(channels=8, blocks=1))


class SlowGenerator:
    """Delegates to a real generator after ``delay`` seconds; raises for batches holding ``poison``."""

    device = "cpu"

    def __init__(self, inner: CropGenerator, delay: float = 0.0, poison: FaceJob | None = None) -> None:
        self.inner = inner
        self.delay = delay
        self.poison = poison

    def __call__(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        time.sleep(self.delay)
        if any(job is self.poison for job in jobs):
            raise RuntimeError("poisoned job")
        return self.inner(jobs)


def value(metrics: EngineMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"device": "cpu"}) or 0.0


async def test_a_late_job_behind_another_streams_job_is_discarded_and_the_worker_lives(
    generator: CropGenerator,
) -> None:
    # Issue 11: list.remove compared the late request with the first one field by
    # field, FaceJob arrays included -> ValueError, and the worker task died.
    metrics = EngineMetrics()
    worker = InferenceWorker(generator, max_batch=4, max_wait=0.05, metrics=metrics, open_streams=lambda: 3)
    worker.start()
    try:
        now = time.monotonic()
        for _ in range(3):
            worker.service_time.observe(3, 0.3, now)  # a batch of three takes 0.3 s
        far = now + 30
        a = await worker.submit(face_job(1), "call-a", far)
        b = await worker.submit(face_job(2), "call-b", now + 0.15)  # cannot make it: discarded
        c = await worker.submit(face_job(3), "call-c", far)
        crops = await asyncio.gather(a, c)
        assert all(crop.shape == (256, 256, 3) for crop in crops)
        assert b.cancelled()
        assert worker.running and worker.restarts == 0 and worker.failed_batches == 0
        assert worker.recent[-1].streams == frozenset({"call-a", "call-c"})
        assert value(metrics, "kfgan_engine_inference_expired_total") == 1
        # And it keeps serving every stream afterwards.
        more = [await worker.submit(face_job(10 + i), f"call-{i}", None) for i in range(3)]
        assert len(await asyncio.gather(*more)) == 3
    finally:
        await worker.stop()


async def test_a_failing_batch_fails_only_its_own_jobs(generator: CropGenerator, caplog) -> None:
    poison = face_job(99)
    metrics = EngineMetrics()
    worker = InferenceWorker(SlowGenerator(generator, poison=poison), max_batch=4, max_wait=0.05, metrics=metrics,
                             open_streams=lambda: 2)
    worker.start()
    try:
        good = await worker.submit(face_job(1), "a")
        bad = await worker.submit(poison, "b")
        assert (await good).shape == (256, 256, 3)  # retried alone, restored
        with pytest.raises(RuntimeError, match="poisoned"):
            await bad
        with caplog.at_level(logging.WARNING, logger="kfgan_daemon.engine.inference"):
            for _ in range(20):
                with pytest.raises(RuntimeError):
                    await (await worker.submit(poison, "b"))
        assert worker.running and worker.restarts == 0
        assert value(metrics, "kfgan_engine_inference_errors_total") >= 21
        # 20 failing batches, at most one line about them: no per-frame flood.
        assert len([r for r in caplog.records if "generator failed" in r.getMessage()]) <= 1
    finally:
        await worker.stop()


async def test_a_killed_worker_is_restarted_and_its_batch_fails_cleanly(generator: CropGenerator, caplog) -> None:
    metrics = EngineMetrics()
    worker = InferenceWorker(SlowGenerator(generator, delay=0.3), metrics=metrics, restart_delay=0.2)
    worker.start()
    try:
        in_flight = await worker.submit(face_job(1), "a")
        await asyncio.sleep(0.1)  # the generator is busy with it
        assert worker._task is not None
        with caplog.at_level(logging.ERROR, logger="kfgan_daemon.engine.inference"):
            worker._task.cancel()  # killed on purpose
            with pytest.raises(EngineError, match="cancelled"):
                await in_flight
        assert not worker.running and worker.started
        assert value(metrics, "kfgan_engine_inference_up") == 0
        waiting = await worker.submit(face_job(2), "a")  # queued for the worker that comes back
        assert (await asyncio.wait_for(waiting, 10)).shape == (256, 256, 3)
        assert worker.running and worker.restarts == 1
        assert value(metrics, "kfgan_engine_inference_restarts_total") == 1
        assert value(metrics, "kfgan_engine_inference_up") == 1
        assert [r.levelno for r in caplog.records if "restarting it" in r.getMessage()] == [logging.ERROR]
    finally:
        await worker.stop()
    with pytest.raises(EngineError):
        await worker.submit(face_job(3), "a")


def test_throttled_log_counts_what_it_held_back(caplog) -> None:
    clock = [0.0]
    throttled = ThrottledLog(logging.getLogger("kfgan-test"), interval=10.0, clock=lambda: clock[0])
    with caplog.at_level(logging.WARNING, logger="kfgan-test"):
        for second in range(25):
            clock[0] = float(second)
            for _ in range(25):  # a frame rate's worth of the same warning every second
                throttled.warning("stream-1", "frame failed")
        throttled.warning("stream-2", "other stream")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "frame failed",
        "frame failed (and 249 more like it in the last 10 s)",
        "frame failed (and 249 more like it in the last 10 s)",
        "other stream",
    ]
    assert throttled.held_back("stream-1") == 124
