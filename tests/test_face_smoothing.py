"""One Euro smoothing of landmarks: steady when still, close behind when moving, reset on a new face."""
from __future__ import annotations

import numpy as np
import pytest

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face import LandmarkSmoother, OneEuroSettings
from kfgan_daemon.face.landmarks import ShapeFrame

FPS = 25.0


def face(center=(320.0, 240.0), radius=60.0) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * np.pi, 68, endpoint=False)
    return np.stack([center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], axis=1)


def test_still_face_jitter_is_reduced():
    rng = np.random.default_rng(0)
    truth = face()
    smoother = LandmarkSmoother()
    raw, smoothed = [], []
    for index in range(100):
        noisy = truth + rng.normal(0.0, 0.5, truth.shape)  # the shape predictor's jitter on a still face
        raw.append(noisy)
        smoothed.append(smoother.smooth(noisy, index / FPS))
    raw_jitter = np.abs(np.diff(raw[20:], axis=0)).mean()
    smooth_jitter = np.abs(np.diff(smoothed[20:], axis=0)).mean()
    assert smooth_jitter < 0.35 * raw_jitter
    # Steady, and still centred on the face.
    assert np.abs(np.mean(smoothed[20:], axis=0) - truth).mean() < 0.15


def test_moving_face_is_followed_closely():
    smoother = LandmarkSmoother()
    scale = ShapeFrame.of(face()).scale
    lags = []
    for index in range(50):
        # Two face scales per second: a brisk head movement.
        truth = face(center=(320.0 + 2.0 * scale * index / FPS, 240.0))
        lags.append(np.abs(smoother.smooth(truth, index / FPS) - truth).max())
    # A lagging crop would misplace the landmark image and the warped reference.
    assert max(lags[25:]) < 0.02 * scale


def test_first_point_and_reset_take_the_input_as_is():
    smoother = LandmarkSmoother()
    first = face()
    np.testing.assert_array_equal(smoother.smooth(first, 0.0), first)
    smoother.smooth(first + 5.0, 0.04)
    elsewhere = face(center=(100.0, 100.0))
    smoother.reset()
    np.testing.assert_array_equal(smoother.smooth(elsewhere, 0.08), elsewhere)


def test_missing_timestamps_fall_back_to_a_frame_period():
    smoother = LandmarkSmoother()
    smoother.smooth(face(), None)
    moved = smoother.smooth(face() + 2.0, None)
    assert np.all((moved > face()) & (moved < face() + 2.0))


def test_bad_settings_and_shapes_raise():
    with pytest.raises(ConfigError, match="min_cutoff"):
        OneEuroSettings(min_cutoff=0.0)
    with pytest.raises(ValueError, match="68x2"):
        LandmarkSmoother().smooth(np.zeros((68, 3)))
