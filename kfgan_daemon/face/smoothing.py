"""Landmarks steadied over time with a One Euro filter (Casiez, Roussel, Vogel; CHI 2012).

The shape predictor's landmarks jitter by a pixel or two from frame to frame even
on a still face; the aligned crop, the landmark image and the paste footprint
follow them, so the restored face shimmers. The One Euro filter is a low-pass
whose cut-off rises with speed: a still face is smoothed hard, a moving one is
followed with little lag. Speeds are measured in face scales per second (the
rigid landmarks' RMS radius), so the same settings fit a thumbnail and a close-up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face.landmarks import ShapeFrame

# Used when frames carry no timestamps, or two frames carry the same one.
_FALLBACK_FRAME_SECONDS = 1.0 / 25.0


@dataclass(frozen=True, slots=True)
class OneEuroSettings:
    """min_cutoff (Hz): cut-off of a still face; lower is steadier. beta: how fast the cut-off
    rises with speed (per face scale per second); higher lags less. d_cutoff (Hz): cut-off of
    the speed estimate itself."""

    min_cutoff: float = 1.0
    beta: float = 10.0
    d_cutoff: float = 1.0

    def __post_init__(self) -> None:
        if self.min_cutoff <= 0 or self.d_cutoff <= 0 or self.beta < 0:
            raise ConfigError(
                f"landmark smoothing: min_cutoff and d_cutoff must be > 0 and beta >= 0, got {self}"
            )


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class LandmarkSmoother:
    """One Euro filter over the 68 (x, y) points of one tracked face.

    ``smooth(landmarks, timestamp)`` returns the filtered points; ``reset()`` forgets
    the history, so that a newly detected face is taken as it is, never pulled
    towards where the previous one was.
    """

    def __init__(self, settings: OneEuroSettings | None = None) -> None:
        self.settings = settings or OneEuroSettings()
        self.reset()

    def reset(self) -> None:
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self._time: float | None = None

    def follow(self, landmarks: np.ndarray | None, timestamp: float | None, new_face: bool) -> np.ndarray | None:
        """The tracker's latest landmarks, smoothed; the history is dropped when the face was lost
        (``landmarks`` None) or found afresh (``new_face``)."""
        if landmarks is None or new_face:
            self.reset()
        return None if landmarks is None else self.smooth(landmarks, timestamp)

    def smooth(self, landmarks: np.ndarray, timestamp: float | None = None) -> np.ndarray:
        """Filtered copy of ``landmarks`` (68x2 float64, frame coordinates) at ``timestamp`` seconds."""
        points = np.array(landmarks, dtype=np.float64)
        if points.shape != (68, 2):
            raise ValueError(f"expected 68x2 landmarks, got shape {points.shape}")
        if self._value is None:
            self._value, self._speed, self._time = points, np.zeros_like(points), timestamp
            return points.copy()
        dt = _FALLBACK_FRAME_SECONDS
        if timestamp is not None and self._time is not None and timestamp > self._time:
            dt = timestamp - self._time
        self._time = timestamp
        scale = max(ShapeFrame.of(points).scale, 1e-6)
        settings = self.settings
        raw_speed = (points - self._value) / (dt * scale)
        self._speed = self._speed + _alpha(settings.d_cutoff, dt) * (raw_speed - self._speed)
        # One cut-off per point, from the speed of the point (both coordinates together).
        cutoff = settings.min_cutoff + settings.beta * np.hypot(self._speed[:, 0], self._speed[:, 1])
        alpha = _alpha(cutoff, dt)[:, None]
        self._value = self._value + alpha * (points - self._value)
        return self._value.copy()
