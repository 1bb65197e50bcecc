"""Affine MLS warp: published integer map against the fixture, and the fast mode's behaviour."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kfgan_daemon.face import mls_displacement, mls_warp


def _control_grid() -> np.ndarray:
    xs, ys = np.meshgrid([40.0, 128.0, 216.0], [40.0, 128.0, 216.0])
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _textured(size=256) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["fast", "published"])
def test_identity_when_landmarks_equal(mode):
    image = _textured()
    points = _control_grid() + 0.25  # off the pixel grid too
    np.testing.assert_array_equal(mls_warp(image, points, points, mode=mode), image)


def test_translation_is_exact():
    points = _control_grid()
    xs, ys = np.arange(0.0, 256.0, 17.0), np.arange(0.0, 256.0, 31.0)
    displacement = mls_displacement(points + (3.0, -2.0), points, xs, ys)
    np.testing.assert_allclose(displacement[..., 0], -3.0, atol=1e-9)
    np.testing.assert_allclose(displacement[..., 1], 2.0, atol=1e-9)


@pytest.mark.parametrize("mode", ["fast", "published"])
def test_moves_a_point_to_its_destination(mode):
    src = _control_grid()
    dst = src.copy()
    dst[4] = (140.0, 120.0)  # centre point moves by (+12, -8)
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[126:131, 126:131] = 255  # a blob on the source centre point
    warped = mls_warp(image, src, dst, mode=mode)
    ys, xs = np.nonzero(warped[:, :, 0] > 127)
    # The published map truncates its source coordinates, which can cost up to one pixel.
    tolerance = 0.5 if mode == "fast" else 1.5
    assert abs(xs.mean() - 140.0) < tolerance and abs(ys.mean() - 120.0) < tolerance


def test_control_point_on_a_pixel_maps_exactly_to_its_source():
    src = _control_grid()
    dst = src.copy()
    dst[4] = (137.0, 121.0)
    coincident = mls_displacement(dst, src, np.array([137.0]), np.array([121.0]))
    np.testing.assert_array_equal(coincident[0, 0], src[4] - dst[4])
    image = _textured()
    warped = mls_warp(image, src, dst, mode="published")
    np.testing.assert_array_equal(warped[121, 137], image[128, 128])
    assert np.isfinite(mls_displacement(dst, src, np.arange(256.0), np.arange(100.0, 140.0))).all()


def test_duplicate_control_points_are_finite():
    src = np.vstack([_control_grid(), [[128.0, 128.0]]])
    dst = src.copy()
    dst[-1] = (130.0, 128.0)
    assert np.isfinite(mls_displacement(dst, src, np.arange(0.0, 256.0, 8.0), np.arange(0.0, 256.0, 8.0))).all()
    assert mls_warp(_textured(), src, dst).shape == (256, 256, 3)


def test_collinear_control_points_fall_back_to_translation():
    src = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0]])
    displacement = mls_displacement(src + 4.0, src, np.arange(0.0, 64.0, 8.0), np.arange(0.0, 64.0, 8.0))
    assert np.isfinite(displacement).all()


def test_non_square_and_gray_images():
    src = _control_grid() * 0.5
    dst = src + 1.5
    gray = _textured(128)[:, :100, 0].copy()
    for mode in ("fast", "published"):
        out = mls_warp(gray, src, dst, mode=mode)
        assert out.shape == gray.shape and out.dtype == gray.dtype


def test_bad_arguments():
    image = _textured(32)
    with pytest.raises(ValueError):
        mls_warp(image, np.zeros((4, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        mls_warp(image, _control_grid(), _control_grid(), mode="nearest")
    with pytest.raises(ValueError):
        mls_warp(image, _control_grid(), _control_grid(), grid_step=0)


@pytest.mark.shared
def test_published_mode_matches_official_warp(official_fixture):
    warped = mls_warp(
        official_fixture["crop_original_key"],
        official_fixture["crop_landmarks_key"],
        official_fixture["crop_landmarks_target"],
        mode="published",
    )
    difference = np.abs(warped.astype(np.int16) - official_fixture["warped_reference"].astype(np.int16))
    assert difference.mean() <= 0.005
    assert (difference.max(axis=2) == 0).mean() >= 0.999


@pytest.mark.shared
def test_fast_mode_close_to_published(official_fixture):
    args = (
        official_fixture["crop_original_key"],
        official_fixture["crop_landmarks_key"],
        official_fixture["crop_landmarks_target"],
    )
    fast = mls_warp(*args, mode="fast").astype(np.int16)
    published = official_fixture["warped_reference"].astype(np.int16)
    # The published map truncates (a half-pixel shift on average); the fast one samples bilinearly.
    assert np.abs(fast - published).mean() < 4.0
    # Against the exact float map sampled the same (bilinear) way, the coarse grid costs little.
    exact = mls_displacement(args[2], args[1], np.arange(256.0), np.arange(256.0))
    grid = np.stack(np.meshgrid(np.arange(256.0), np.arange(256.0)), axis=2)
    source_map = (grid + exact).astype(np.float32)
    dense = cv2.remap(args[0], source_map, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(fast - dense.astype(np.int16)).mean() < 0.5
