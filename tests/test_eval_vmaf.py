"""VMAF through the optional vmaf-torch package (skipped where it is not installed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from kfgan_daemon.errors import MetricUnavailableError
from kfgan_daemon.eval import vmaf as vmaf_module
from kfgan_daemon.eval.vmaf import CHUNK_FRAMES, VmafMeter, vmaf_unavailable_reason

needs_vmaf = pytest.mark.skipif(vmaf_unavailable_reason() is not None, reason="vmaf-torch is not installed (optional)")


def _frames(count: int, size: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for i in range(count):
        base = (np.sin((x + 2 * i) / 6.0) * np.cos(y / 9.0) * 100 + 128).astype(np.uint8)
        texture = rng.integers(0, 40, (size, size), dtype=np.uint8)
        # A luma plane in the limited (16..235) range, as a decoded yuv420p frame has.
        frames.append((16 + (base // 2 + texture).astype(np.uint16) * 219 // 255).astype(np.uint8))
    return frames


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
    as_tensor = lambda fs: torch.from_numpy(np.stack(fs)).float()[:, None]  # noqa: E731
    with torch.no_grad():
        whole = VMAF(temporal_pooling=True, clip_score=True)(as_tensor(frames), as_tensor(distorted)).item()
    assert chunked["vmaf"] == pytest.approx(whole, abs=1e-3)


@needs_vmaf
def test_eval_scores_a_tiny_clip_and_harder_compression_scores_lower(tmp_path):
    from clips import write_synthetic_clip
    from kfgan_daemon.eval.evaluate import evaluate

    clip = write_synthetic_clip(tmp_path / "tiny.mp4", frames=12, width=160, height=128, fps=10)
    scores = {}
    for crf in (18, 51):
        report = evaluate(clip, crf=crf, models=[], out_dir=tmp_path / f"crf{crf}", vmaf=True)
        (row,) = report.clips[0].rows
        assert 0.0 <= row.vmaf_neg <= row.vmaf + 1e-6 <= 100.0 + 1e-6
        scores[crf] = row.vmaf
    assert scores[51] < scores[18] - 10.0
    assert "VMAF-NEG" in (tmp_path / "crf51" / "eval.md").read_text()
