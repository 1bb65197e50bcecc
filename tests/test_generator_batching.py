"""The full model batched across streams (the GPU path), checked on the CPU; half precision on CUDA only."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from kfgan_daemon.engine import InferenceWorker
from kfgan_daemon.model.full import FullGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.job import FaceJob

pytestmark = pytest.mark.timeout(300)


def face_job(seed: int, size: int = 128) -> FaceJob:
    """Random crops; 128 px (the full model takes any multiple of 16) keeps the CPU run short."""
    rng = np.random.default_rng(seed)
    crops = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    return FaceJob(crops[0], crops[1], crops[2], np.eye(2, 3), np.zeros((68, 2)), key_id=0)


def full_generator(device: str = "cpu", half: bool = False) -> CropGenerator:
    torch.manual_seed(0)
    return CropGenerator(FullGenerator(), device=device, half=half)


@pytest.mark.slow
async def test_full_model_restores_two_streams_in_one_batch_as_it_would_one_by_one() -> None:
    generator = full_generator()
    jobs = [face_job(1), face_job(2)]
    alone = [generator([job])[0] for job in jobs]
    worker = InferenceWorker(generator, max_batch=4, max_wait=0.5, open_streams=lambda: 2)
    worker.start()
    try:
        futures = [await worker.submit(job, f"cam{n}") for n, job in enumerate(jobs)]
        batched = await asyncio.gather(*futures)
    finally:
        await worker.stop()
    (record,) = worker.recent
    assert record.size == 2 and record.streams == {"cam0", "cam1"}
    for one, together in zip(alone, batched):
        assert np.abs(one - together).max() < 0.5  # levels: batched kernels sum in another order


def test_half_precision_is_refused_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        full_generator(half=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision runs on CUDA only; no GPU here")
def test_full_model_in_half_precision_on_cuda_matches_float32() -> None:
    jobs = [face_job(n, size=256) for n in range(4)]
    reference = full_generator("cuda")(jobs)
    half = full_generator("cuda", half=True)(jobs)
    for a, b in zip(reference, half):
        assert np.abs(a.astype(int) - b).mean() < 1.0
