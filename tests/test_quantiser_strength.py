"""The model's gain on its correction by the frame's quantiser: stored in the model file, fitted on crops, applied per crop."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kfgan_daemon.errors import ModelError
from kfgan_daemon.model import (
    LiteGenerator,
    attach_native_detail,
    attach_quantiser_strength,
    read_checkpoint,
    save_safetensors,
)
from kfgan_daemon.model.quantiser_strength import QuantiserStrength, StrengthFit, scale_corrections
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.model_choice import open_generator
from kfgan_daemon.restore.onnx_generator import OnnxCropGenerator, onnxruntime_available
from tests.test_native_detail import _centred

STRENGTH = QuantiserStrength(np.array([20.0, 30.0, 40.0]), np.array([0.4, 0.6, 1.2]))


def test_the_gain_is_interpolated_held_beyond_the_ends_and_one_when_unknown() -> None:
    assert STRENGTH.at(25.0) == pytest.approx(0.5)
    assert STRENGTH.at(10.0) == pytest.approx(0.4) and STRENGTH.at(51.0) == pytest.approx(1.2)
    assert STRENGTH.at(None) == 1.0 and STRENGTH.at(float("nan")) == 1.0
    with pytest.raises(ModelError, match="increasing quantisers"):
        QuantiserStrength(np.array([30.0, 20.0]), np.array([1.0, 1.0]))


def test_corrections_are_scaled_crop_by_crop() -> None:
    compressed = torch.rand(3, 3, 8, 8)
    restored = compressed + torch.rand(3, 3, 8, 8) - 0.5
    scaled = scale_corrections(restored, compressed, [20.0, None, 40.0], STRENGTH)
    assert torch.allclose(scaled[0], compressed[0] + 0.4 * (restored[0] - compressed[0]))
    assert torch.equal(scaled[1], restored[1])
    assert torch.allclose(scaled[2], compressed[2] + 1.2 * (restored[2] - compressed[2]))
    assert scale_corrections(restored, compressed, [20.0, 30.0, 40.0], None) is restored


class AddsOne(nn.Module):
    """A 'generator' whose correction is +1/255 everywhere, to see how much of it arrives."""

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        return compressed + 1.0 / 255.0 + 0.0 * (reference + landmarks)


def _job(quantiser: float | None) -> FaceJob:
    crop = np.full((256, 256, 3), 100, np.uint8)
    return FaceJob(crop, crop, crop, np.eye(2, 3), np.zeros((68, 2)), 0, quantiser=quantiser)


def test_the_generator_scales_its_correction_by_the_jobs_quantiser() -> None:
    jobs = [_job(20.0), _job(35.0), _job(None)]
    generators = [CropGenerator(AddsOne(), quantiser_strength=STRENGTH)]
    if onnxruntime_available():
        generators.append(OnnxCropGenerator(AddsOne(), quantiser_strength=STRENGTH))  # type: ignore[arg-type]
    for generator in generators:
        fine, middle, unknown = generator(jobs)
        assert np.allclose(fine, 100.4, atol=1e-3)
        assert np.allclose(middle, 100.9, atol=1e-3)
        assert np.allclose(unknown, 101.0, atol=1e-3)
    assert np.allclose(CropGenerator(AddsOne())(jobs)[0], 101.0, atol=1e-3)


def test_the_model_file_carries_its_strength_beside_its_filter(tmp_path: Path) -> None:
    path = save_safetensors(LiteGenerator(), tmp_path / "model.safetensors", "lite", reference_flow="dis-fast")
    attach_native_detail(path, _centred(), {"videos": ["synthetic"]})
    assert read_checkpoint(path).quantiser_strength is None and open_generator(path).quantiser_strength is None
    attach_quantiser_strength(path, STRENGTH, {"files": 1})
    read = read_checkpoint(path)
    assert read.quantiser_strength is not None and read.native_detail is not None and read.reference_flow == "dis-fast"
    assert read.quantiser_strength.at(25.0) == pytest.approx(0.5)
    assert set(read.state_dict) == set(LiteGenerator().state_dict())
    generator = open_generator(path)
    assert generator.quantiser_strength is not None and generator.quantiser_strength.at(40.0) == pytest.approx(1.2)
    with pytest.raises(ModelError, match="fit-strength"):
        QuantiserStrength.from_tensors({"quantiser_strength.gains": np.ones(2)}, "odd.safetensors")


def test_the_fit_finds_each_bins_least_squares_gain() -> None:
    rng = np.random.default_rng(0)
    fit = StrengthFit(prior_crops=0.0)
    for _ in range(50):
        error = rng.normal(size=(16, 16, 3))
        fit.add(21.0 + rng.random(), 2.0 * error, error)  # corrects twice too hard: gain 1/2
        fit.add(41.0 + rng.random(), 0.5 * error + 0.1 * rng.normal(size=error.shape), error)  # half as hard: about 2
    strength, crops = fit.result()
    assert crops == [50, 50]
    assert 21.0 < strength.quantisers[0] < 22.0 and 41.0 < strength.quantisers[1] < 42.0
    assert strength.gains[0] == pytest.approx(0.5) and strength.gains[1] == pytest.approx(2.0, abs=0.1)
    # A prior of crops' worth of correction pulls a thin bin towards the generator as trained.
    thin = StrengthFit(prior_crops=4.0)
    error = rng.normal(size=(16, 16, 3))
    thin.add(30.0, 2.0 * error, error)
    assert 0.5 < thin.result()[0].gains[0] < 1.0
    # A finer bin never gets more correction than a coarser one: the two are pooled.
    pooled = StrengthFit(prior_crops=0.0)
    pooled.add(20.0, 0.5 * error, error)  # alone: gain 2
    pooled.add(40.0, 2.0 * error, error)  # alone: gain 1/2
    energy = float((error**2).sum())
    expected = (0.5 * energy + 2.0 * energy) / (0.25 * energy + 4.0 * energy)
    assert pooled.result()[0].gains == pytest.approx([expected, expected])
    with pytest.raises(ModelError, match="no crops"):
        StrengthFit().result()
