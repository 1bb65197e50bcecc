"""Face flicker: how much a row's error under the face changes from one frame to the next.

For every pair of consecutive frames that both have a face, the error of a row
(its luma minus the original's) is taken over the face region of the later
frame, and the mean absolute change of that error from the earlier frame is the
pair's flicker, in luma levels. A clip's flicker is the mean over its pairs. The
codec's own frame-to-frame noise gives the input a flicker; a restoration that
shimmers (crop jitter, a mask edge that jumps, frames alternating between
restored and not) scores above it, a steady one at or below it.

The face region is the footprint of the aligned crop in the frame: the pixels the
paste-back may change.
"""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from kfgan_daemon.face.align import CROP_SIZE


def face_region_mask(matrix: np.ndarray, height: int, width: int, size: int = CROP_SIZE) -> np.ndarray:
    """H x W bool mask of the frame pixels that the frame -> crop ``matrix`` maps inside the crop."""
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64)
    polygon = corners @ inverse[:, :2].T + inverse[:, 2]
    mask = np.zeros((height, width), np.uint8)
    cv2.fillConvexPoly(mask, np.round(polygon * 16).astype(np.int32), 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


class FlickerMeter:
    """Accumulates the face flicker of several rows (input, models) over one clip."""

    def __init__(self) -> None:
        self._previous: dict[str, np.ndarray] = {}
        self._changes: dict[str, list[float]] = {}

    def add(self, truth_luma: np.ndarray, rows: Mapping[str, np.ndarray], face: np.ndarray | None) -> None:
        """One frame: the original's luma, each row's luma (all H x W), and the face region
        (a bool mask, None when the frame has no face, which breaks the chain of pairs)."""
        if face is None:
            self._previous.clear()
            return
        truth = truth_luma.astype(np.float32)
        current: dict[str, np.ndarray] = {}
        for key, luma in rows.items():
            error = luma.astype(np.float32) - truth
            previous = self._previous.get(key)
            if previous is not None and face.any():
                self._changes.setdefault(key, []).append(float(np.abs(error - previous)[face].mean()))
            current[key] = error
        self._previous = current

    def flicker(self, key: str) -> float | None:
        """Mean flicker of a row over the clip's pairs; None when no two consecutive frames had a face."""
        changes = self._changes.get(key)
        return float(np.mean(changes)) if changes else None

    def pairs(self, key: str) -> int:
        return len(self._changes.get(key, ()))
