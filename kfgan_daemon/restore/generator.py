"""Runs a generator module on batches of face jobs: uint8 crops in, float32 crops out.

The restored crops keep the generator's fractional levels (clamped to [0, 255],
not rounded): the paste adds the difference between restored and compressed crop
to the frame and rounds once, there. Rounding each crop first would add a fresh
+-0.5-level pattern to every frame's correction, which shows as flicker on a face
that the generator leaves almost unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face.native_detail import NativeDetailFilter
from kfgan_daemon.face.reference_flow import refined_references
from kfgan_daemon.model.quantiser_strength import QuantiserStrength, scale_corrections
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.timing import median_seconds

# Batch-1 calls behind the machine's speed figure (seconds_per_crop): enough for a steady
# median, about a second with the lite model.
SPEED_CALLS = 10


def seconds_per_crop(generator: Callable[[Sequence[FaceJob]], list[np.ndarray]]) -> float:
    """Median seconds of a batch-1 call of ``generator`` on the calling thread (its torch thread
    settings apply): the machine's speed, the figure the live plan starts from and benches quote.
    The crops are noise rather than zeros, so that no content-dependent shortcut makes the call
    cheaper than a face's."""
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (256, 256, 3), np.uint8)
    reference = rng.integers(0, 256, (256, 256, 3), np.uint8)
    job = FaceJob(crop, reference, np.zeros_like(crop), np.eye(2, 3), np.zeros((68, 2), np.int64), -1)
    return median_seconds(lambda: generator([job]), SPEED_CALLS)


def crops_to_tensor(crops: Sequence[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """RGB uint8 HxWx3 crops -> N x 3 x H x W RGB float in [0, 1] (the published input convention).

    On a GPU the uint8 batch goes up from pinned host memory without blocking (a
    quarter of the bytes of floats), and is converted there.
    """
    batch = torch.from_numpy(np.stack(crops))
    if device.type == "cuda":
        batch = batch.pin_memory()
    tensor = batch.to(device, non_blocking=True)
    return tensor.permute(0, 3, 1, 2).to(dtype).div_(255.0)


def tensor_to_crops(tensor: torch.Tensor) -> list[np.ndarray]:
    """N x 3 x H x W RGB float in [0, 1] -> RGB float32 H x W x 3 crops in levels [0, 255], clamped
    as the published code does but not rounded (see the module's docstring)."""
    array = tensor.detach().float().clamp_(0.0, 1.0).mul_(255.0)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(crop) for crop in array]


def as_picture(crop: np.ndarray) -> np.ndarray:
    """A restored crop rounded to uint8 levels, as a picture of it is shown or stored."""
    return crop if crop.dtype == np.uint8 else np.rint(crop).astype(np.uint8)


class CropGenerator:
    """A loaded generator bound to a device and precision.

    Not thread-safe: the engine gives each device exactly one inference worker.
    """

    def __init__(
        self,
        module: nn.Module,
        device: str | torch.device = "cpu",
        half: bool = False,
        source: Path | None = None,
        native_detail: NativeDetailFilter | None = None,
        reference_flow: str | None = None,
        quantiser_strength: QuantiserStrength | None = None,
    ) -> None:
        # The checkpoint file the module came from (None: built in code), for reports and /readyz.
        self.source = source
        # The model's filter for a close-up's own detail band, applied by the paste (None: none).
        self.native_detail = native_detail
        # How the model was trained to have its warped keyframe refined (face.reference_flow; None: not).
        self.reference_flow = reference_flow
        # The model's gain on its correction by the frame's quantiser (None: full correction).
        self.quantiser_strength = quantiser_strength
        self.device = torch.device(device)
        if half and self.device.type == "cpu":
            raise ConfigError("half: half precision needs a CUDA device; use float32 on the CPU")
        self.dtype = torch.float16 if half else torch.float32
        self.module = module.to(self.device, self.dtype).eval()

    def __call__(self, jobs: Sequence[FaceJob]) -> list[np.ndarray]:
        if not jobs:
            return []
        crops = [job.compressed for job in jobs]
        references = refined_references(crops, [job.reference for job in jobs], self.reference_flow)
        with torch.inference_mode():
            compressed = crops_to_tensor(crops, self.device, self.dtype)
            reference = crops_to_tensor(references, self.device, self.dtype)
            landmarks = crops_to_tensor([job.landmark_image for job in jobs], self.device, self.dtype)
            restored = self.module(compressed, reference, landmarks)
            restored = scale_corrections(restored, compressed, [job.quantiser for job in jobs], self.quantiser_strength)
        return tensor_to_crops(restored)

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one batch so that the first real frame does not pay for lazy initialisation."""
        blank = np.zeros((256, 256, 3), np.uint8)
        job = FaceJob(blank, blank, blank, np.eye(2, 3), np.zeros((68, 2), np.int64), -1)
        self([job] * batch_size)
