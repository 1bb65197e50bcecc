"""Similarity alignment of a face to a square crop, with the published conventions.

The checkpoint was trained on crops made this way, so every constant and every
integer cast below is part of the model's input contract, not a tuning choice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from kfgan_daemon.errors import InputError

CROP_SIZE = 256
# Desired position of the "left" eye (landmarks 42-47) as a fraction of the crop side;
# the other eye mirrors it horizontally.
DESIRED_LEFT_EYE = (0.38, 0.45)


@dataclass
class AlignedFace:
    """A face cut out of a frame: the crop, the frame -> crop matrix, and the crop landmarks."""

    crop: np.ndarray  # size x size x 3 uint8, same channel order as the frame
    matrix: np.ndarray  # 2x3 float64, frame -> crop
    crop_landmarks: np.ndarray  # 68x2 int64 (x, y) in crop coordinates


def _check_landmarks(landmarks: np.ndarray) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape != (68, 2):
        raise InputError(f"expected 68x2 landmarks, got shape {points.shape}")
    return points


def alignment_matrix(landmarks: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """2x3 similarity transform (frame -> size x size crop) from 68 landmarks."""
    points = _check_landmarks(landmarks)
    # The published code casts the eye centres (and their midpoint) to int before use.
    left_eye = points[42:48].mean(axis=0).astype(np.int64)
    right_eye = points[36:42].mean(axis=0).astype(np.int64)
    dx, dy = (right_eye - left_eye).tolist()
    eye_distance = math.hypot(dx, dy)
    if eye_distance == 0:
        raise InputError("degenerate landmarks: both eye centres coincide")
    angle = math.degrees(math.atan2(dy, dx)) - 180.0
    desired_distance = (1.0 - 2.0 * DESIRED_LEFT_EYE[0]) * size
    scale = desired_distance / eye_distance
    mid_x = int((left_eye[0] + right_eye[0]) // 2)
    mid_y = int((left_eye[1] + right_eye[1]) // 2)
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


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = CROP_SIZE) -> AlignedFace:
    """Cut the size x size aligned crop (bicubic) and its landmarks out of `image`."""
    matrix = alignment_matrix(landmarks, size)
    crop = cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC)
    return AlignedFace(crop=crop, matrix=matrix, crop_landmarks=crop_landmarks(landmarks, matrix))
