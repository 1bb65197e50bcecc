"""The warped keyframe refined by optical flow: where the model file asks for it, on every path that feeds the model."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.errors import ModelError
from kfgan_daemon.face.reference_flow import refine_reference, refined_references
from kfgan_daemon.model import LiteGenerator, attach_native_detail, read_checkpoint, save_safetensors
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.model_choice import open_generator
from kfgan_daemon.restore.onnx_generator import OnnxCropGenerator, onnxruntime_available
from tests.test_native_detail import _centred


def _textured(seed: int = 3) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    return cv2.GaussianBlur(rgb, (0, 0), 3.0)


def _shifted(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    return cv2.warpAffine(image, np.float32([[1, 0, dx], [0, 1, dy]]), (256, 256), borderMode=cv2.BORDER_REFLECT)


def _interior_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a[24:-24, 24:-24].astype(np.float32) - b[24:-24, 24:-24]).mean())


def test_a_reference_off_by_a_few_pixels_is_brought_back_onto_the_crop() -> None:
    compressed = _textured()
    reference = _shifted(compressed, 3.0, -2.0)
    refined = refine_reference(compressed, reference)
    assert refined.dtype == np.uint8 and refined.shape == reference.shape
    assert _interior_error(refined, compressed) < 0.25 * _interior_error(reference, compressed)
    assert refined_references([compressed], [reference], None)[0] is reference


class ReturnsTheReference(nn.Module):
    """A 'generator' that outputs its reference input, to see what it was fed."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return reference + 0.0 * (compressed + landmarks)


def _job() -> FaceJob:
    compressed = _textured()
    return FaceJob(compressed, _shifted(compressed, 3.0, -2.0), np.zeros_like(compressed), np.eye(2, 3), np.zeros((68, 2)), 0)


def test_the_generator_is_fed_refined_references_only_when_its_model_asks() -> None:
    job = _job()
    (plain,) = CropGenerator(ReturnsTheReference())([job])
    (refined,) = CropGenerator(ReturnsTheReference(), reference_flow="dis-fast")([job])
    assert np.allclose(plain, job.reference, atol=1e-3)
    assert np.allclose(refined, refine_reference(job.compressed, job.reference), atol=1e-3)
    if onnxruntime_available():
        (onnx,) = OnnxCropGenerator(ReturnsTheReference(), reference_flow="dis-fast")([job])
        assert np.allclose(onnx, refined, atol=1e-3)


def test_the_model_file_says_how_its_reference_is_refined(tmp_path: Path) -> None:
    plain = save_safetensors(LiteGenerator(), tmp_path / "plain.safetensors", "lite")
    assert read_checkpoint(plain).reference_flow is None and open_generator(plain).reference_flow is None
    path = save_safetensors(LiteGenerator(), tmp_path / "flow.safetensors", "lite", reference_flow="dis-fast")
    attach_native_detail(path, _centred(), {"videos": ["synthetic"]})  # keeps the rest of the metadata
    assert read_checkpoint(path).reference_flow == "dis-fast"
    assert open_generator(path).reference_flow == "dis-fast"
    if onnxruntime_available():
        assert open_generator(path, runtime="onnxruntime").reference_flow == "dis-fast"
    with pytest.raises(ModelError, match="reference_flow"):
        save_safetensors(LiteGenerator(), tmp_path / "odd.safetensors", "lite", reference_flow="raft")
