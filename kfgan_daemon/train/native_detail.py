"""Fitting a model's native detail filter (see :mod:`kfgan_daemon.face.native_detail`) on real close-ups.

Every training video whose face is larger than the crop is degraded at each of the
dataset's CRFs and senders, as a call would deliver it, and walked with the
daemon's own tracking and alignment. Where the paste would act (paste weight at
least one half) each sample's band neighbourhood and what the crop-scale part
misses (original minus the resampled received frame) go into per-class normal
equations; the filter is their ridge-regularised least-squares solution with one
kernel shared by all classes. It needs no gradient steps: minutes on a CPU.
"""
from __future__ import annotations

import itertools
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from kfgan_daemon.errors import InputError
from kfgan_daemon.face.native_detail import (
    ACTIVITY_EDGES,
    FULL_STRENGTH_SCALE,
    KERNEL_SIZE,
    NativeDetailFilter,
    activity_classes,
)

log = logging.getLogger(__name__)

# A class with fewer samples than this keeps gain 1: the band as the shared kernel leaves it.
_MIN_CLASS_SAMPLES = 1000
# Alternations of the shared-kernel fit (kernel given gains, gains given kernel); it settles in a few.
_ALTERNATIONS = 30


@dataclass
class BandStatistics:
    """Per-class normal equations of ``target ~ kernel . band patch``."""

    edges: tuple[float, ...] = ACTIVITY_EDGES
    size: int = KERNEL_SIZE
    gram: np.ndarray = field(init=False)
    cross: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        classes, weights = len(self.edges) + 1, self.size * self.size
        self.gram = np.zeros((classes, weights, weights))
        self.cross = np.zeros((classes, weights))
        self.counts = np.zeros(classes, np.int64)

    def add(
        self,
        band: np.ndarray,
        target: np.ndarray,
        where: np.ndarray,
        rng: np.random.Generator,
        samples: int | None = None,
    ) -> int:
        """Add the samples of one region where ``where`` holds (at most ``samples`` of them, drawn
        at random); returns how many went in."""
        if band.shape != target.shape or band.shape != where.shape:
            raise ValueError(f"band {band.shape}, target {target.shape} and mask {where.shape} differ in shape")
        ys, xs = np.nonzero(where)
        if samples is not None and len(ys) > samples:
            chosen = rng.choice(len(ys), samples, replace=False)
            ys, xs = ys[chosen], xs[chosen]
        if len(ys) == 0:
            return 0
        radius = self.size // 2
        band = np.asarray(band, dtype=np.float32)
        # Edge padding is the paste's BORDER_REPLICATE.
        windows = sliding_window_view(np.pad(band, radius, mode="edge"), (self.size, self.size))
        patches = windows[ys, xs].reshape(len(ys), -1).astype(np.float64)
        values = np.asarray(target, dtype=np.float64)[ys, xs]
        classes = activity_classes(band, self.edges)[ys, xs]
        for index in np.unique(classes):
            chosen = classes == index
            rows = patches[chosen]
            self.gram[index] += rows.T @ rows
            self.cross[index] += rows.T @ values[chosen]
            self.counts[index] += int(chosen.sum())
        return len(ys)

    def solve(self, ridge: float = 1e-3) -> NativeDetailFilter:
        """One shared kernel and a gain per class, by alternating least squares (``ridge`` times
        the mean diagonal keeps each step well posed), started from the main direction of the
        classes' own least-squares kernels."""
        fitted = self.counts >= _MIN_CLASS_SAMPLES
        if not fitted.any():
            raise InputError(f"too few band samples to fit ({int(self.counts.sum())}); use more close-up frames")
        gram, cross = self.gram[fitted], self.cross[fitted]
        own = np.stack([np.linalg.solve(g + _damping(g, ridge), x) for g, x in zip(gram, cross)])
        kernel = np.linalg.svd(own * np.sqrt(self.counts[fitted])[:, None], full_matrices=False)[2][0]
        for _ in range(_ALTERNATIONS):
            gains = _gains(kernel, gram, cross)
            # Given the gains, the kernel solves sum_c g_c^2 G_c k = sum_c g_c x_c.
            system = np.einsum("c,cij->ij", gains**2, gram)
            kernel = np.linalg.solve(system + _damping(system, ridge), gains @ cross)
            kernel /= np.linalg.norm(kernel)
        # Kernel and gains are defined up to a common sign: keep the centre tap positive.
        kernel *= np.sign(kernel[len(kernel) // 2]) or 1.0
        all_gains = np.ones(len(self.counts))
        all_gains[fitted] = _gains(kernel, gram, cross)
        return NativeDetailFilter(
            kernel.reshape(self.size, self.size), all_gains, np.asarray(self.edges, np.float32)
        )


def _gains(kernel: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """Each class's least-squares gain for a fixed kernel."""
    return np.array([(kernel @ x) / (kernel @ g @ kernel) for g, x in zip(gram, cross)])


def _damping(gram: np.ndarray, ridge: float) -> np.ndarray:
    return ridge * float(np.trace(gram)) / gram.shape[0] * np.eye(gram.shape[0])


@dataclass
class FitReport:
    """What went into a fit, for the model file's metadata and the command's summary."""

    videos: list[str] = field(default_factory=list)  # those with close-up frames
    skipped: list[str] = field(default_factory=list)  # faces no larger than the crop
    crfs: list[int] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    frames: int = 0
    samples: int = 0
    per_class: list[int] = field(default_factory=list)

    def as_metadata(self) -> dict[str, object]:
        return {
            "videos": self.videos,
            "crfs": self.crfs,
            "senders": self.senders,
            "frames": self.frames,
            "samples": self.samples,
            "samples_per_class": self.per_class,
            "kernel_size": KERNEL_SIZE,
            "full_strength_scale": FULL_STRENGTH_SCALE,
        }


def accumulate_video(
    original: Path,
    received: Path,
    statistics: BandStatistics,
    rng: np.random.Generator,
    samples_per_frame: int = 8000,
    max_frames: int | None = None,
    probe_frames: int | None = None,
) -> int:
    """Walk ``original`` and its ``received`` (degraded) copy in lockstep and add the band of every
    frame whose face is larger than the crop; returns the frames used. With ``probe_frames``, give
    up on a video that has no such frame among its first ``probe_frames``."""
    from kfgan_daemon.face.align import CROP_SIZE
    from kfgan_daemon.face.paste import crop_scale, frame_band, paste_box, paste_weights
    from kfgan_daemon.media import FileSource
    from kfgan_daemon.restore.settings import RestoreSettings
    from kfgan_daemon.restore.stream import StreamRestorer

    # The identity check only empties keyframe stores; the band needs the face's alignment alone.
    restorer = StreamRestorer(RestoreSettings(identity_check=False))
    crop_size = (CROP_SIZE, CROP_SIZE)
    used = 0
    with FileSource(original) as truth_source, FileSource(received) as received_source:
        for count, (truth, frame) in enumerate(zip(truth_source, received_source)):
            if max_frames is not None and count >= max_frames:
                break
            if probe_frames is not None and used == 0 and count >= probe_frames:
                break
            matrix = restorer.locate(frame)
            if matrix is None or crop_scale(matrix) > FULL_STRENGTH_SCALE:
                continue
            box = paste_box(matrix, crop_size, frame.width, frame.height)
            if box is None:
                continue
            x0, y0, x1, y1 = box
            band = frame_band(frame, matrix, crop_size, box)
            # What the filtered band should add to the resampled frame (native - band).
            target = truth.y[y0:y1, x0:x1].astype(np.float32) - (frame.y[y0:y1, x0:x1].astype(np.float32) - band)
            where = paste_weights(matrix, crop_size, box) >= 0.5
            if statistics.add(band, target, where, rng, samples_per_frame):
                used += 1
    return used


def fit_native_detail(
    videos: Mapping[str, Path],
    crfs: Sequence[int],
    senders: Sequence[str],
    *,
    keyint_seconds: float = 1.0,
    max_frames: int = 90,
    preset: str = "medium",
    samples_per_frame: int = 8000,
    probe_frames: int = 15,
    seed: int = 0,
    on_video: Callable[[str, int], None] | None = None,
) -> tuple[NativeDetailFilter, FitReport]:
    """Fit a filter on ``videos`` (name -> original) degraded at every CRF and sender.

    ``on_video(name, frames)`` is told after each video (0 frames: skipped, no close-up).
    """
    from kfgan_daemon.train.dataset import encode_degraded

    if not videos:
        raise InputError("no videos to fit the native detail filter on")
    statistics = BandStatistics()
    rng = np.random.default_rng(seed)
    report = FitReport(crfs=list(crfs), senders=list(senders))
    with tempfile.TemporaryDirectory(prefix="kfgan-detail-") as scratch:
        for name, original in videos.items():
            frames = 0
            for n, (crf, sender) in enumerate(itertools.product(crfs, senders)):
                received = Path(scratch) / f"{name}-crf{crf}-{sender}.mp4"
                encode_degraded(original, received, crf, keyint_seconds, preset, max_frames, sender)
                probe = probe_frames if n == 0 else None
                used = accumulate_video(original, received, statistics, rng, samples_per_frame, max_frames, probe)
                received.unlink()
                frames += used
                if used == 0 and n == 0:
                    break  # no face larger than the crop in its first frames
            (report.videos if frames else report.skipped).append(name)
            report.frames += frames
            log.info("native detail: %s gave %d frames", name, frames)
            if on_video is not None:
                on_video(name, frames)
    if report.frames == 0:
        raise InputError(
            f"none of the {len(videos)} videos shows a face larger than the crop; the filter is for close-ups"
        )
    report.samples = int(statistics.counts.sum())
    report.per_class = [int(c) for c in statistics.counts]
    return statistics.solve(), report
