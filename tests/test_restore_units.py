"""The restore package's plumbing, without faces or trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.restore.generator import CropGenerator, as_picture, crops_to_tensor, tensor_to_crops
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.timing import StageTimer


def _job(rng: np.random.Generator) -> FaceJob:
    def crop() -> np.ndarray:
        return rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)

    return FaceJob(crop(), crop(), crop(), np.eye(2, 3), np.zeros((68, 2), np.int64), 0)


def test_crop_tensor_conversion_is_rgb_unit_range_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(2)]
    tensor = crops_to_tensor(crops, torch.device("cpu"), torch.float32)
    assert tensor.shape == (2, 3, 256, 256)
    # crops are RGB, as the generator's tensors: channel 0 is red
    np.testing.assert_allclose(tensor[1, 0].numpy(), crops[1][..., 0] / 255.0, atol=1e-7)
    back = tensor_to_crops(tensor)
    for original, restored in zip(crops, back):
        np.testing.assert_allclose(restored, original, atol=1e-4)
        np.testing.assert_array_equal(as_picture(restored), original)


def test_crop_tensors_follow_the_published_convention(official_fixture) -> None:
    """The published input: BGR crops / 255, then a channel flip. Our crops are RGB already."""
    bgr = official_fixture["crop_compressed_target"]
    published = torch.from_numpy(np.ascontiguousarray(bgr.astype(np.float32)[..., ::-1] / 255.0)).permute(2, 0, 1)[None]
    ours = crops_to_tensor([np.ascontiguousarray(bgr[..., ::-1])], torch.device("cpu"), torch.float32)
    assert torch.equal(ours, published)


def test_tensor_to_crops_clamps_out_of_range_values() -> None:
    tensor = torch.full((1, 3, 4, 4), 1.7)
    tensor[0, :, 0, 0] = -0.3
    tensor[0, :, 2, 2] = 0.5
    (crop,) = tensor_to_crops(tensor)
    assert crop[0, 0].tolist() == [0, 0, 0]
    assert crop[1, 1].tolist() == [255, 255, 255]
    # Levels stay fractional: the paste rounds once, after adding the correction to the frame.
    assert crop.dtype == np.float32 and crop[2, 2].tolist() == [127.5, 127.5, 127.5]
    assert as_picture(crop)[2, 2].tolist() == [128, 128, 128] and as_picture(crop).dtype == np.uint8


class _Blend(nn.Module):
    """Mixes its three inputs with fixed weights, so each input's routing is visible in the output."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return 0.5 * compressed + 0.25 * reference + 0.25 * landmarks


def test_crop_generator_batches_jobs_and_routes_inputs() -> None:
    rng = np.random.default_rng(1)
    jobs = [_job(rng) for _ in range(3)]
    out = CropGenerator(_Blend())(jobs)
    assert len(out) == 3
    for job, crop in zip(jobs, out):
        expected = 0.5 * job.compressed + 0.25 * job.reference.astype(np.float64) + 0.25 * job.landmark_image
        assert crop.dtype == np.float32
        assert np.abs(crop.astype(np.float64) - expected).max() < 1e-3


def test_crop_generator_refuses_half_precision_on_cpu() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        CropGenerator(_Blend(), device="cpu", half=True)


def test_stage_timer_accumulates_per_stage() -> None:
    timer = StageTimer()
    timer.add("warp", 0.002)
    timer.add("warp", 0.004)
    with timer.stage("paste"):
        pass
    means = timer.mean_ms()
    assert means["warp"] == pytest.approx(3.0)
    assert timer.totals["paste"].count == 1
