"""The generator under ONNX Runtime gives the crops PyTorch gives, for batches of any size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kfgan_daemon.errors import ModelError
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.model_choice import open_generator
from kfgan_daemon.restore.onnx_generator import OnnxCropGenerator, onnxruntime_available

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="needs the [onnx] extra (onnx, onnxruntime)")


def job(seed: int) -> FaceJob:
    rng = np.random.default_rng(seed)
    crops = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(3)]
    return FaceJob(crops[0], crops[1], crops[2], np.eye(2, 3), np.zeros((68, 2)), key_id=0)


def test_onnxruntime_matches_torch_on_batches() -> None:
    torch.manual_seed(0)
    module = LiteGenerator(channels=8, blocks=1)
    torch.nn.init.normal_(module.tail.weight, std=0.05)  # a fresh LiteGenerator is the identity
    torch_generator = CropGenerator(module)
    onnx_generator = OnnxCropGenerator(module, threads=1)
    jobs = [job(1), job(2), job(3)]
    expected = torch_generator(jobs)
    for batch in ([jobs[0]], jobs):
        got = onnx_generator(batch)
        assert len(got) == len(batch)
        for restored, reference in zip(got, expected):
            assert restored.dtype == np.float32 and restored.shape == (256, 256, 3)
            assert np.abs(restored - reference).max() < 0.01  # levels: the same arithmetic, reordered
    assert any(not np.array_equal(crop, j.compressed) for crop, j in zip(expected, jobs))


def test_onnxruntime_refuses_cuda_and_half() -> None:
    with pytest.raises(ModelError, match="CPU"):
        open_generator(runtime="onnxruntime", half=True)
    with pytest.raises(ModelError, match="runtime"):
        open_generator(runtime="tensorrt")
