"""Paste-back with the published soft mask, computed inside the face rectangle only."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from kfgan_daemon.errors import InputError
from kfgan_daemon.face import align_face, alignment_matrix, paste_back
from tests.test_face_align import synthetic_landmarks


def full_frame_paste(frame: np.ndarray, crop: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The published convention over the whole frame, written plainly as the reference."""
    height, width = frame.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    face = cv2.warpAffine(crop, inverse, (width, height))
    mask = cv2.warpAffine(np.ones(crop.shape[:2], np.float32), inverse, (width, height))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(mask.sum())) // 20
    soft = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
    soft = cv2.GaussianBlur(soft, (2 * edge + 1, 2 * edge + 1), 0)
    blended = soft[:, :, None] * (mask[:, :, None] * face) + (1 - soft[:, :, None]) * frame
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _frame(height=480, width=640) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "center,angle",
    [((320.0, 240.0), 0.0), ((300.0, 200.0), 17.0), ((40.0, 30.0), -8.0), ((620.0, 470.0), 5.0)],
)
def test_equals_full_frame_reference(center, angle):
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=center, angle_deg=angle))
    crop = np.random.default_rng(6).integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    pasted = paste_back(frame, crop, matrix)
    reference = full_frame_paste(frame, crop, matrix)
    assert np.abs(pasted.astype(np.int16) - reference.astype(np.int16)).max() <= 1


def test_pixels_outside_the_mask_are_unchanged():
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=(320.0, 240.0)))
    crop = np.full((256, 256, 3), 255, dtype=np.uint8)
    pasted = paste_back(frame, crop, matrix)
    inverse = cv2.invertAffineTransform(matrix)
    footprint = cv2.warpAffine(np.ones((256, 256), np.float32), inverse, (640, 480)) > 0
    np.testing.assert_array_equal(pasted[~footprint], frame[~footprint])
    # The middle of the face is the crop.
    centre = np.rint(inverse @ [128.0, 128.0, 1.0]).astype(int)
    assert (pasted[centre[1], centre[0]] == 255).all()
    assert pasted is not frame and (frame != pasted).any()


def test_round_trip_of_own_crop_is_nearly_identity():
    frame = cv2.GaussianBlur(_frame(), (0, 0), 3)
    aligned = align_face(frame, synthetic_landmarks(center=(320.0, 240.0), eye_distance=120.0))
    pasted = paste_back(frame, aligned.crop, aligned.matrix)
    assert np.abs(pasted.astype(np.int16) - frame.astype(np.int16)).mean() < 0.5


def test_face_outside_frame_returns_copy():
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=(5000.0, 5000.0)))
    pasted = paste_back(frame, np.zeros((256, 256, 3), np.uint8), matrix)
    np.testing.assert_array_equal(pasted, frame)
    assert pasted is not frame


def test_face_area_override_changes_the_blend_width():
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=(320.0, 240.0)))
    crop = np.full((256, 256, 3), 255, dtype=np.uint8)
    narrow = paste_back(frame, crop, matrix, face_area=100.0)
    wide = paste_back(frame, crop, matrix)
    assert (narrow == 255).all(axis=2).sum() > (wide == 255).all(axis=2).sum()


def test_channel_mismatch_raises():
    with pytest.raises(InputError):
        paste_back(_frame(), np.zeros((256, 256, 1), np.uint8), np.eye(2, 3))
