"""Paste-back into the frame's YUV planes: published and continuous masks, replace and correction pastes."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from kfgan_daemon.face import (
    align_frame,
    alignment_matrix,
    crop_footprint,
    paste_face,
    paste_weights,
)
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from tests.test_face_align import synthetic_landmarks

SPACE = ColourSpace("bt709")


def full_frame_published_mask(matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """The published mask over the whole frame (soft * mask), written plainly as the reference."""
    inverse = cv2.invertAffineTransform(matrix)
    mask = cv2.warpAffine(np.ones((256, 256), np.float32), inverse, (width, height))
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(math.sqrt(mask.sum())) // 20
    soft = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
    soft = cv2.GaussianBlur(soft, (2 * edge + 1, 2 * edge + 1), 0)
    return soft * mask


def _frame(height: int = 480, width: int = 640, seed: int = 5) -> DecodedFrame:
    rgb = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return DecodedFrame.from_rgb(cv2.GaussianBlur(rgb, (0, 0), 1.5), SPACE)


def _weights(matrix: np.ndarray, width: int, height: int, mask: str) -> np.ndarray:
    box = crop_footprint(matrix, (256, 256), width, height)
    full = np.zeros((height, width), np.float32)
    if box is not None:
        full[box[1] : box[3], box[0] : box[2]] = paste_weights(matrix, (256, 256), box, mask)
    return full


@pytest.mark.parametrize(
    "center,angle",
    [((320.0, 240.0), 0.0), ((300.0, 200.0), 17.0), ((40.0, 30.0), -8.0), ((620.0, 470.0), 5.0)],
)
def test_published_mask_in_the_footprint_equals_the_full_frame_one(center, angle):
    matrix = alignment_matrix(synthetic_landmarks(center=center, angle_deg=angle))
    reference = full_frame_published_mask(matrix, 640, 480)
    assert np.abs(_weights(matrix, 640, 480, "published") - reference).max() < 1e-5


@pytest.mark.parametrize("mask", ["continuous", "published"])
@pytest.mark.parametrize("mode", ["correction", "replace"])
@pytest.mark.parametrize("space", [ColourSpace("bt601"), ColourSpace("bt709", full_range=True)])
def test_only_pixels_under_the_mask_change(mode, mask, space):
    frame = DecodedFrame.from_rgb(_frame().rgb(), space)
    matrix = alignment_matrix(synthetic_landmarks(center=(300.0, 220.0), angle_deg=9.0))
    compressed = align_frame(frame, synthetic_landmarks(center=(300.0, 220.0), angle_deg=9.0)).crop
    restored = np.full((256, 256, 3), 250, dtype=np.uint8)
    pasted = paste_face(frame, restored, matrix, compressed=compressed, mode=mode, mask=mask)
    weight = _weights(matrix, 640, 480, mask)
    untouched = weight == 0
    assert untouched.mean() > 0.5 and (~untouched).sum() > 10_000
    np.testing.assert_array_equal(pasted.y[untouched], frame.y[untouched])
    chroma_untouched = cv2.resize(weight, (320, 240), interpolation=cv2.INTER_AREA) == 0
    np.testing.assert_array_equal(pasted.u[chroma_untouched], frame.u[chroma_untouched])
    np.testing.assert_array_equal(pasted.v[chroma_untouched], frame.v[chroma_untouched])
    # Where the weight is 1 the face is there (bright crop: luma pushed up).
    inside = weight > 0.999
    assert (pasted.y[inside].astype(int) - frame.y[inside]).mean() > 20
    assert pasted.y is not frame.y and frame.same_pixels(DecodedFrame.from_rgb(_frame().rgb(), space))


def test_correction_of_an_unchanged_crop_changes_nothing():
    frame = _frame()
    landmarks = synthetic_landmarks(center=(320.0, 240.0), eye_distance=160.0)
    aligned = align_frame(frame, landmarks)
    pasted = paste_face(frame, aligned.crop, aligned.matrix, compressed=aligned.crop, mode="correction")
    assert pasted.same_pixels(frame)


def test_correction_keeps_native_detail_where_replace_blurs_it():
    # A face much larger than the crop: the crop is a downscaled copy of it.
    frame = _frame(seed=7)
    landmarks = synthetic_landmarks(center=(320.0, 240.0), eye_distance=200.0)
    aligned = align_frame(frame, landmarks)
    brighter = np.clip(aligned.crop.astype(int) + 6, 0, 255).astype(np.uint8)
    corrected = paste_face(frame, brighter, aligned.matrix, compressed=aligned.crop, mode="correction")
    replaced = paste_face(frame, brighter, aligned.matrix, mode="replace")
    inside = _weights(aligned.matrix, 640, 480, "continuous") > 0.999
    shift = 6 * 219 / 255
    corrected_error = corrected.y[inside].astype(float) - frame.y[inside] - shift
    replaced_error = replaced.y[inside].astype(float) - frame.y[inside] - shift
    # The correction paste is the frame plus the brightening, to within rounding.
    assert np.abs(corrected_error).max() <= 1.0
    assert np.abs(replaced_error).mean() > 5 * np.abs(corrected_error).mean()


def test_continuous_mask_changes_smoothly_with_the_face_size():
    box_of = lambda matrix: crop_footprint(matrix, (256, 256), 640, 480)  # noqa: E731
    sums = {}
    for shape in ("continuous", "published"):
        totals = []
        for eye_distance in np.linspace(100.0, 104.0, 41):
            matrix = alignment_matrix(synthetic_landmarks(center=(320.0, 240.0), eye_distance=eye_distance))
            box = box_of(matrix)
            weights = paste_weights(matrix, (256, 256), box, shape)
            # The mask's area relative to the footprint's: constant for a mask that scales with the face.
            totals.append(float(weights.sum()) / (256 / math.sqrt(abs(np.linalg.det(matrix[:, :2])))) ** 2)
        sums[shape] = np.abs(np.diff(totals))
    # The published mask's erosion jumps by whole pixels; the continuous one never jumps.
    assert sums["continuous"].max() < 0.2 * sums["published"].max()
    assert sums["continuous"].max() < 2e-3


def test_face_outside_frame_returns_an_unchanged_copy():
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=(5000.0, 5000.0)))
    pasted = paste_face(frame, np.zeros((256, 256, 3), np.uint8), matrix, mode="replace")
    assert pasted.same_pixels(frame) and pasted.y is not frame.y


def test_face_area_override_changes_the_published_blend_width():
    frame = _frame()
    matrix = alignment_matrix(synthetic_landmarks(center=(320.0, 240.0)))
    crop = np.full((256, 256, 3), 255, dtype=np.uint8)
    narrow = paste_face(frame, crop, matrix, mode="replace", mask="published", face_area=100.0)
    wide = paste_face(frame, crop, matrix, mode="replace", mask="published")
    assert (narrow.y == 235).sum() > (wide.y == 235).sum()


def test_bad_arguments_raise():
    frame = _frame()
    with pytest.raises(ValueError, match="HxWx3"):
        paste_face(frame, np.zeros((256, 256, 1), np.uint8), np.eye(2, 3), mode="replace")
    with pytest.raises(ValueError, match="compressed crop"):
        paste_face(frame, np.zeros((256, 256, 3), np.uint8), np.eye(2, 3))
