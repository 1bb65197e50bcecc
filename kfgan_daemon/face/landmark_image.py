"""The generator's landmark input: one white pixel per landmark on black."""
from __future__ import annotations

import numpy as np

from kfgan_daemon.face.align import CROP_SIZE


def landmark_image(crop_landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """size x size x 3 uint8 image, 255 at each landmark (x, y clamped to the crop), else 0."""
    points = np.rint(np.asarray(crop_landmarks, dtype=np.float64)).astype(np.int64)
    xs = np.clip(points[:, 0], 0, size - 1)
    ys = np.clip(points[:, 1], 0, size - 1)
    image = np.zeros((size, size, 3), dtype=np.uint8)
    image[ys, xs] = 255
    return image
