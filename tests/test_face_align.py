"""Alignment, crop landmarks and landmark image: the published conventions."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kfgan_daemon.face import align_face, alignment_matrix, crop_landmarks, landmark_image, transform_points


def synthetic_landmarks(center=(300.0, 200.0), eye_distance=80.0, angle_deg=0.0) -> np.ndarray:
    """68 points with both eye groups centred exactly on integer positions, rotated by angle."""
    rng = np.random.default_rng(3)
    points = rng.uniform(-60, 60, size=(68, 2))
    ring = np.array([[-10, 0], [-5, -4], [5, -4], [10, 0], [5, 4], [-5, 4]], dtype=np.float64)
    # Image-left eye (landmarks 36-41) and image-right eye (42-47) around (-d/2, 0) and (+d/2, 0).
    points[36:42] = ring + (-eye_distance / 2, 0)
    points[42:48] = ring + (eye_distance / 2, 0)
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    return points @ rotation.T + center


def test_alignment_puts_eyes_at_published_positions():
    landmarks = synthetic_landmarks()
    matrix = alignment_matrix(landmarks)
    right_eye = transform_points(landmarks[36:42].mean(axis=0, keepdims=True), matrix)[0]
    left_eye = transform_points(landmarks[42:48].mean(axis=0, keepdims=True), matrix)[0]
    # "left" is landmarks 42-47; it lands at x = 1 - 0.38 of the crop after the 180-degree convention.
    np.testing.assert_allclose(left_eye, [256 * 0.62, 256 * 0.45], atol=1e-9)
    np.testing.assert_allclose(right_eye, [256 * 0.38, 256 * 0.45], atol=1e-9)


def test_alignment_undoes_roll():
    upright = alignment_matrix(synthetic_landmarks(angle_deg=0.0))
    rolled_landmarks = synthetic_landmarks(angle_deg=20.0, eye_distance=200.0)
    rolled = alignment_matrix(rolled_landmarks)
    # Same rotation-free crop geometry: the linear part of the rolled matrix is a rotation by -20 degrees.
    angle = math.degrees(math.atan2(rolled[1, 0], rolled[0, 0]))
    assert angle == pytest.approx(-20.0, abs=0.5)
    assert upright[0, 1] == pytest.approx(0.0, abs=1e-12)


def test_align_face_crop_and_landmarks():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)
    landmarks = synthetic_landmarks()
    aligned = align_face(image, landmarks)
    assert aligned.crop.shape == (256, 256, 3) and aligned.crop.dtype == np.uint8
    assert aligned.crop_landmarks.dtype == np.int64
    np.testing.assert_array_equal(aligned.crop_landmarks, np.rint(transform_points(landmarks, aligned.matrix)))


def test_degenerate_and_bad_landmarks_raise():
    with pytest.raises(ValueError, match="coincide"):
        alignment_matrix(np.zeros((68, 2)))
    with pytest.raises(ValueError, match="68x2"):
        alignment_matrix(np.zeros((5, 2)))


def test_landmark_image_marks_each_point_clamped():
    points = np.array([[0, 0], [10, 20], [300, -5], [255, 255]])
    image = landmark_image(points)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    marked = {tuple(p) for p in np.argwhere(image[:, :, 0] == 255)}
    assert marked == {(0, 0), (20, 10), (0, 255), (255, 255)}
    assert (image[:, :, 0] == image[:, :, 2]).all()
    assert image.sum() == 4 * 3 * 255


@pytest.mark.shared
@pytest.mark.parametrize("which", ["key", "target"])
def test_matches_official_alignment(official_fixture, which):
    landmarks = official_fixture[f"landmarks_{which}"]
    matrix = alignment_matrix(landmarks, mode="published")
    np.testing.assert_array_equal(matrix, official_fixture[f"align_matrix_{which}"])
    np.testing.assert_array_equal(crop_landmarks(landmarks, matrix), official_fixture[f"crop_landmarks_{which}"])


@pytest.mark.shared
def test_matches_official_crops_and_landmark_image(official_fixture):
    def published(frame: str, landmarks: str):
        return align_face(official_fixture[frame], official_fixture[landmarks], mode="published")

    target = published("frame_compressed_target", "landmarks_target")
    np.testing.assert_array_equal(target.crop, official_fixture["crop_compressed_target"])
    np.testing.assert_array_equal(target.crop_landmarks, official_fixture["crop_landmarks_target"])
    original = published("frame_original_target", "landmarks_target")
    np.testing.assert_array_equal(original.crop, official_fixture["crop_original_target"])
    key = published("frame_original_key", "landmarks_key")
    np.testing.assert_array_equal(key.crop, official_fixture["crop_original_key"])
    np.testing.assert_array_equal(landmark_image(target.crop_landmarks), official_fixture["landmark_image"])


def test_subpixel_alignment_follows_fractional_motion():
    landmarks = synthetic_landmarks(center=(300.25, 200.0))
    shifts = []
    for step in range(4):
        moved = landmarks + (0.25 * step, 0.0)
        shifts.append(transform_points(moved[36:48].mean(axis=0, keepdims=True), alignment_matrix(moved))[0, 0])
        published = transform_points(moved[36:48].mean(axis=0, keepdims=True), alignment_matrix(moved, mode="published"))
        # The published cast snaps the eye midpoint to whole pixels, so the face slides inside the crop.
        assert abs(published[0, 0] - 128.0) <= 1.0
    # Sub-pixel: the eyes' midpoint stays exactly at the crop's centre however far the face moved.
    np.testing.assert_allclose(shifts, 128.0, atol=1e-9)


