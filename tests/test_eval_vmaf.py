"""VMAF through the optional vmaf-torch package (skipped where it is not installed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from kfgan_daemon.errors import MetricUnavailableError
from kfgan_daemon.eval import vmaf as vmaf_module
from kfgan_daemon.eval.vmaf import CHUNK_FRAMES, VmafMeter, limited_range_luma, vmaf_unavailable_reason

needs_vmaf = pytest.mark.skipif(vmaf_unavailable_reason() is not None, reason="vmaf-torch is not installed (optional)")


def _frames(count: int, size: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(count):
        base = (np.sin((x + 2 * i) / 6.0) * np.cos(y / 9.0) * 100 + 128).astype(np.uint8)
        texture = rng.integers(0, 40, (size, size), dtype=np.uint8)
        frames.append(np.repeat((base // 2 + texture)[..., None], 3, axis=2))
    return frames


def test_limited_range_luma_maps_black_and_white_to_video_levels():
    picture = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
    assert limited_range_luma(picture).tolist() == [[16, 235]]


def test_meter_says_how_to_get_vmaf_when_missing(monkeypatch):
    monkeypatch.setattr(vmaf_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MetricUnavailableError, match="pip install vmaf-torch"):
        VmafMeter()


@needs_vmaf
def test_identical_frames_score_high_and_blur_scores_lower():
    frames = _frames(4)
    meter = VmafMeter()
    for frame in frames:
        meter.add(frame, {"same": frame, "blurred": cv2.GaussianBlur(frame, (9, 9), 3.0)})
    scores = meter.scores()
    assert scores["same"]["vmaf"] > 95.0
    assert scores["blurred"]["vmaf"] < scores["same"]["vmaf"] - 10.0
    assert scores["blurred"]["vmaf_neg"] <= scores["blurred"]["vmaf"] + 1e-6


@needs_vmaf
def test_chunked_scores_equal_one_pass_over_the_whole_sequence():
    from vmaf_torch import VMAF

    frames = _frames(CHUNK_FRAMES + 5)
    distorted = [cv2.GaussianBlur(f, (5, 5), 1.5) for f in frames]
    meter = VmafMeter()
    for frame, bad in zip(frames, distorted):
        meter.add(frame, {"blur": bad})
    chunked = meter.scores()["blur"]
    as_tensor = lambda fs: torch.from_numpy(np.stack([limited_range_luma(f) for f in fs])).float()[:, None]  # noqa: E731
    with torch.no_grad():
        whole = VMAF(temporal_pooling=True, clip_score=True)(as_tensor(frames), as_tensor(distorted)).item()
    assert chunked["vmaf"] == pytest.approx(whole, abs=1e-3)
