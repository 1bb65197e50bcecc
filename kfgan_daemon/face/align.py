"""Similarity alignment of a face to a square crop, with the published conventions.

The checkpoint was trained on crops made this way, so every constant below is part
of the model's input contract, not a tuning choice. The published code also casts
the eye centres to int, so the crop moves in whole-pixel steps while the face moves
smoothly; that is what makes a restored face shimmer. "subpixel" (the default) keeps
the eye centres as they are; "published" keeps the casts, for parity with the
authors' crops.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import cv2
import numpy as np

from kfgan_daemon.media.colour import Box, even_box

if TYPE_CHECKING:
    from kfgan_daemon.media.frame import DecodedFrame

CROP_SIZE = 256
# Desired position of the "left" eye (landmarks 42-47) as a fraction of the crop side;
# the other eye mirrors it horizontally.
DESIRED_LEFT_EYE = (0.38, 0.45)

AlignmentMode = Literal["subpixel", "published"]
ALIGNMENT_MODES: tuple[str, ...] = get_args(AlignmentMode)


@dataclass
class AlignedFace:
    """A face cut out of a frame: the crop, the frame -> crop matrix, and the crop landmarks."""

    crop: np.ndarray  # size x size x 3 uint8, same channel order as the frame
    matrix: np.ndarray  # 2x3 float64, frame -> crop
    crop_landmarks: np.ndarray  # 68x2 int64 (x, y) in crop coordinates


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise ValueError(f"expected 68x2 landmarks, got shape {points.shape}")
    return points


def alignment_matrix(landmarks: np.ndarray, size: int = CROP_SIZE, mode: AlignmentMode = "subpixel") -> np.ndarray:
    """2x3 similarity transform (frame -> size x size crop) from 68 landmarks."""
    points = _check_landmarks(landmarks)
    left_eye = points[42:48].mean(axis=0)
    right_eye = points[36:42].mean(axis=0)
    if mode == "published":
        # The published code casts the eye centres (and their midpoint) to int before use.
        left_eye = left_eye.astype(np.int64)
        right_eye = right_eye.astype(np.int64)
    dx, dy = (right_eye - left_eye).tolist()
    eye_distance = math.hypot(dx, dy)
    if eye_distance == 0:
        raise ValueError("degenerate landmarks: both eye centres coincide")
    angle = math.degrees(math.atan2(dy, dx)) - 180.0
    desired_distance = (1.0 - 2.0 * DESIRED_LEFT_EYE[0]) * size
    scale = desired_distance / eye_distance
    if mode == "published":
        mid_x = int((left_eye[0] + right_eye[0]) // 2)
        mid_y = int((left_eye[1] + right_eye[1]) // 2)
    else:
        mid_x = float(left_eye[0] + right_eye[0]) / 2.0
        mid_y = float(left_eye[1] + right_eye[1]) / 2.0
    matrix = cv2.getRotationMatrix2D((mid_x, mid_y), angle, scale)
    matrix[0, 2] += size * 0.5 - mid_x
    matrix[1, 2] += size * DESIRED_LEFT_EYE[1] - mid_y
    return matrix


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix to Nx2 points (float64 result)."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def crop_landmarks(landmarks: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Frame landmarks in crop coordinates, rounded to the nearest int as the published pipeline does."""
    return np.rint(transform_points(landmarks, matrix)).astype(np.int64)


def align_face(
    image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE, mode: AlignmentMode = "subpixel"
) -> AlignedFace:
    """Cut the size x size aligned crop (bicubic) and its landmarks out of `image`."""
    matrix = alignment_matrix(landmarks, size, mode)
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC)
    return AlignedFace(crop=crop, matrix=matrix, crop_landmarks=crop_landmarks(landmarks, matrix))


def crop_footprint(
    matrix: np.ndarray, crop_size: tuple[int, int], width: int, height: int, margin: int = 2
) -> Box | None:
    """The even rectangle of the frame that the crop covers through ``matrix`` (frame -> crop), plus
    ``margin`` pixels, clipped to the frame; None when the crop lies outside it.

    The margin holds the taps of bicubic sampling (2 pixels), so that working on the
    rectangle gives the pixels that working on the whole frame would.
    """
    crop_h, crop_w = crop_size
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0], [crop_w, 0], [0, crop_h], [crop_w, crop_h]], dtype=np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    box = even_box(
        mapped[:, 0].min() - margin, mapped[:, 1].min() - margin,
        mapped[:, 0].max() + margin, mapped[:, 1].max() + margin,
        width, height,
    )
    if box[0] >= box[2] or box[1] >= box[3]:
        return None
    return box


def region_matrix(matrix: np.ndarray, box: Box) -> np.ndarray:
    """``matrix`` (frame -> crop) for the pixels of ``box`` alone: region coordinates are frame
    coordinates minus the rectangle's corner."""
    shifted = np.asarray(matrix, dtype=np.float64).copy()
    shifted[:, 2] += shifted[:, :2] @ np.array([box[0], box[1]], dtype=np.float64)
    return shifted


def align_frame(
    frame: "DecodedFrame", landmarks: np.ndarray, size: int = CROP_SIZE, mode: AlignmentMode = "subpixel"
) -> AlignedFace:
    """:func:`align_face` on a YUV frame: an RGB crop, converting only the pixels under the crop."""
    matrix = alignment_matrix(landmarks, size, mode)
    return AlignedFace(crop=cut_crop(frame, matrix, size), matrix=matrix, crop_landmarks=crop_landmarks(landmarks, matrix))


def cut_crop(frame: "DecodedFrame", matrix: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The size x size RGB crop of a YUV frame through ``matrix`` (frame -> crop), converting only
    the pixels under it; black where the crop lies outside the frame. The ground truth of a face is
    the original frame cut with the compressed frame's matrix."""
    box = crop_footprint(matrix, (size, size), frame.width, frame.height)
    if box is None:
        return np.zeros((size, size, 3), np.uint8)
    return cv2.warpAffine(frame.rgb(box), region_matrix(matrix, box), (size, size), flags=cv2.INTER_CUBIC)
