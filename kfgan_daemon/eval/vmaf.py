"""VMAF and VMAF-NEG through vmaf-torch, when it is installed.

No libvmaf is reachable offline here: PyAV's FFmpeg is built without it, Debian
bookworm packages neither libvmaf nor an FFmpeg linked to it, and the PyPI
binding (pyvmaf) compiles against libvmaf. vmaf-torch (PyPI, BSD) is a PyTorch
reimplementation of libvmaf's vmaf_v0.6.1 model (ADM, VIF, motion features and
the SVM, with the model's support vectors in its source) whose NEG switch sets
the enhancement gain limits of vmaf_v0.6.1neg to 1. It is an optional
dependency; its scores have not been compared with libvmaf's on this machine.

Frames are scored on their decoded 8-bit luma (Y) planes (what libvmaf reads
from an H.264 yuv420p stream), in chunks, so memory stays bounded on long clips:
ADM and VIF are per frame, motion needs only the reference and its previous
frame, and the SVM runs once per frame at the end of the clip.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import numpy as np
import torch

from kfgan_daemon.errors import MetricUnavailableError

VMAF_PACKAGE = "vmaf_torch"
CHUNK_FRAMES = 8


def vmaf_unavailable_reason() -> str | None:
    """None when VMAF can be computed, else one line saying why not and how to get it."""
    if importlib.util.find_spec(VMAF_PACKAGE) is None:
        return (
            "VMAF not measured: no VMAF implementation here (PyAV's FFmpeg has no libvmaf, Debian bookworm "
            "has none); install the optional vmaf-torch package (pip install vmaf-torch) to get VMAF and VMAF-NEG"
        )
    return None


@dataclass(slots=True)
class _Series:
    pending: list[np.ndarray] = field(default_factory=list)
    adm: list[torch.Tensor] = field(default_factory=list)
    vif: list[torch.Tensor] = field(default_factory=list)


class VmafMeter:
    """Scores several distorted versions ("rows") of one clip against its original, frame by frame.

    Call ``add(reference, {row: distorted})`` for every frame in order (uint8 Y
    planes of the decoded frames), then ``scores()`` -> {row: {"vmaf": mean, "vmaf_neg": mean}}.
    """

    def __init__(self, device: str = "cpu") -> None:
        reason = vmaf_unavailable_reason()
        if reason is not None:
            raise MetricUnavailableError(reason)
        from vmaf_torch import VMAF

        self.device = torch.device(device)
        self._models = {
            "vmaf": VMAF(enable_motion=True, clip_score=True, NEG=False).to(self.device).eval(),
            "vmaf_neg": VMAF(enable_motion=True, clip_score=True, NEG=True).to(self.device).eval(),
        }
        self._reference: list[np.ndarray] = []
        self._previous_reference: torch.Tensor | None = None
        self._motion: list[torch.Tensor] = []
        self._series: dict[str, dict[str, _Series]] = {}

    def add(self, reference_luma: np.ndarray, distorted_luma: dict[str, np.ndarray]) -> None:
        self._reference.append(reference_luma)
        for row, plane in distorted_luma.items():
            for series in self._series.setdefault(row, {name: _Series() for name in self._models}).values():
                series.pending.append(plane)
        if len(self._reference) >= CHUNK_FRAMES:
            self._flush()

    def _tensor(self, planes: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(planes)).to(self.device, torch.float32)[:, None]

    @torch.no_grad()
    def _flush(self) -> None:
        if not self._reference:
            return
        reference = self._tensor(self._reference)
        count = len(self._reference)
        any_model = next(iter(self._models.values()))
        # Motion of frame i is the mean absolute difference of blurred frames i and i-1 (0 for the first).
        with_previous = reference if self._previous_reference is None else torch.cat([self._previous_reference, reference])
        motion = any_model.compute_motion(with_previous)[-count:]
        self._motion.append(motion)
        self._previous_reference = reference[-1:]
        for per_model in self._series.values():
            for name, series in per_model.items():
                if len(series.pending) != count:
                    raise ValueError("every row needs a distorted frame for every reference frame")
                distorted = self._tensor(series.pending)
                series.adm.append(self._models[name].compute_adm_score(reference, distorted))
                series.vif.append(self._models[name].compute_vif_features(reference, distorted))
                series.pending.clear()
        self._reference.clear()

    @torch.no_grad()
    def scores(self) -> dict[str, dict[str, float]]:
        """Mean VMAF and VMAF-NEG per row over the frames added so far."""
        self._flush()
        if not self._motion:
            return {}
        motion = torch.cat(self._motion)
        # motion2: the smaller of the motion towards the previous and the next frame; the last frame keeps its own.
        motion2 = torch.minimum(motion, torch.roll(motion, -1, 0))
        motion2[-1] = motion[-1]
        results: dict[str, dict[str, float]] = {}
        for row, per_model in self._series.items():
            results[row] = {}
            for name, series in per_model.items():
                predicted = self._models[name].predict(torch.cat(series.adm), motion2, torch.cat(series.vif))
                results[row][name] = float(predicted.mean())
        return results
