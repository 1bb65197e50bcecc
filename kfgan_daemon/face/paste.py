"""Blend a restored crop back into its frame with the published soft mask.

The crop goes back through the inverted alignment matrix; a mask of ones goes the
same way, is eroded by 2x2, then by a square of side 2 * (sqrt(face area) // 20), and
blurred with a Gaussian of that side + 1. All of it happens inside the rectangle the
crop covers in the frame (plus a margin), which gives the pixels of the whole-frame
computation (within one gray level on the mask's outermost ring) at a fraction of the cost.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from kfgan_daemon.errors import InputError

# Pixels of margin around the crop's footprint: the mask must be zero on the rectangle's
# inner edges so that erosion and blur there see what they would see on the full frame.
_MARGIN = 2


def footprint_rect(
    matrix: np.ndarray, crop_size: tuple[int, int], frame_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) in the frame that the crop covers through `matrix` (frame -> crop), or None if outside."""
    crop_h, crop_w = crop_size
    frame_h, frame_w = frame_size
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0], [crop_w, 0], [0, crop_h], [crop_w, crop_h]], dtype=np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    x0 = max(int(math.floor(mapped[:, 0].min())) - _MARGIN, 0)
    y0 = max(int(math.floor(mapped[:, 1].min())) - _MARGIN, 0)
    x1 = min(int(math.ceil(mapped[:, 0].max())) + _MARGIN, frame_w)
    y1 = min(int(math.ceil(mapped[:, 1].max())) + _MARGIN, frame_h)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, y0, x1, y1


def paste_back(
    frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray, face_area: float | None = None
) -> np.ndarray:
    """Return a new frame with `crop` (aligned by `matrix`, frame -> crop) blended in.

    `face_area` overrides the area (in frame pixels) that sets the mask's erosion and
    blur; by default it is the area of the eroded, warped mask, as in the published code.
    """
    if frame.ndim != 3 or crop.ndim != 3 or frame.shape[2] != crop.shape[2]:
        raise InputError(
            f"paste_back needs HxWxC frame and crop with equal channels, got {frame.shape} and {crop.shape}"
        )
    out = frame.copy()
    rect = footprint_rect(matrix, crop.shape[:2], frame.shape[:2])
    if rect is None:
        return out
    x0, y0, x1, y1 = rect
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    inverse[0, 2] -= x0
    inverse[1, 2] -= y0
    size = (x1 - x0, y1 - y0)
    face = cv2.warpAffine(crop, inverse, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(np.ones(crop.shape[:2], dtype=np.float32), inverse, size, flags=cv2.INTER_LINEAR)
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    area = float(mask.sum()) if face_area is None else float(face_area)
    edge = int(math.sqrt(max(area, 0.0))) // 20
    side = 2 * edge
    if side > 0:
        soft = cv2.erode(mask, np.ones((side, side), np.uint8))
        soft = cv2.GaussianBlur(soft, (side + 1, side + 1), 0)
    else:
        soft = mask
    # Published blend: soft * (mask * face) + (1 - soft) * frame. blendLinear divides by the
    # weights' sum, which is 1 except on the outermost mask ring, where soft is ~0 anyway;
    # it is ten times faster than the same arithmetic in numpy.
    weight_face = cv2.multiply(soft, mask)
    weight_frame = 1.0 - soft
    out[y0:y1, x0:x1] = cv2.blendLinear(face, out[y0:y1, x0:x1], weight_face, weight_frame)
    return out
