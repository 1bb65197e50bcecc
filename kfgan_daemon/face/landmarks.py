"""68-point landmarks with dlib's shape predictor, and the geometry the tracker needs from them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kfgan_daemon.face.detector import FaceBox
from kfgan_daemon.face.models import load_shape_predictor


class LandmarkPredictor:
    """dlib's 68-point shape predictor, run on a grayscale image inside a face box."""

    def __init__(self, path: str | Path | None = None):
        self._predictor = load_shape_predictor(path)

    def __call__(self, gray: np.ndarray, box: FaceBox) -> np.ndarray:
        """68x2 float64 landmarks (x, y) in the coordinates of `gray`."""
        shape = self._predictor(gray, box.to_dlib())
        return np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)


# Nose (27-35) and eyes (36-47): the points that expressions move least, so the box
# derived from them does not breathe with the mouth and jaw.
RIGID_POINTS = slice(27, 48)


@dataclass(frozen=True)
class ShapeFrame:
    """Position and size of a face: centroid of its rigid landmarks and their RMS distance from it."""

    cx: float
    cy: float
    scale: float

    @classmethod
    def of(cls, landmarks: np.ndarray) -> ShapeFrame:
        landmarks = landmarks[RIGID_POINTS]
        centroid = landmarks.mean(axis=0)
        scale = float(np.sqrt(((landmarks - centroid) ** 2).sum(axis=1).mean()))
        return cls(float(centroid[0]), float(centroid[1]), scale)


@dataclass(frozen=True)
class BoxRelation:
    """Where a face box sits relative to the face's rigid landmarks, in units of their scale."""

    dx: float
    dy: float
    width: float
    height: float

    def box_for(self, landmarks: np.ndarray, scale: float | None = None) -> FaceBox:
        """The box for `landmarks`; `scale` overrides their own scale (to move a box without resizing it)."""
        frame = ShapeFrame.of(landmarks)
        if scale is not None:
            frame = ShapeFrame(frame.cx, frame.cy, scale)
        cx = frame.cx + self.dx * frame.scale
        cy = frame.cy + self.dy * frame.scale
        half_w = self.width * frame.scale / 2.0
        half_h = self.height * frame.scale / 2.0
        return FaceBox(cx - half_w, cy - half_h, cx + half_w, cy + half_h)


# The box dlib's HOG detector draws around a face (the kind of box the 68-point predictor
# was trained on), as the mean relation between detector boxes and the landmarks predicted
# in them over many real detections (per-detection spread: about 0.15 in position and 8%
# in size). Tracking boxes are always drawn this way, so a re-detection does not jolt the
# landmarks by the detector's own jitter.
PREDICTOR_BOX = BoxRelation(dx=0.0, dy=0.52, width=4.7, height=4.7)


def shape_residual(landmarks: np.ndarray, reference: np.ndarray) -> float:
    """RMS distance between two landmark sets after the best similarity transform,
    in units of the landmarks' own scale (0: same shape; about 1: unrelated points)."""
    current = landmarks[:, 0] + 1j * landmarks[:, 1]
    ref = reference[:, 0] + 1j * reference[:, 1]
    current = current - current.mean()
    ref = ref - ref.mean()
    current_norm = np.sqrt(np.mean(np.abs(current) ** 2))
    ref_energy = np.sum(np.abs(ref) ** 2)
    if current_norm == 0 or ref_energy == 0:
        return float("inf")
    current = current / current_norm
    # Least-squares complex factor = rotation and scale mapping the reference onto the current shape.
    factor = np.sum(np.conj(ref) * current) / ref_energy
    return float(np.sqrt(np.mean(np.abs(current - factor * ref) ** 2)))
