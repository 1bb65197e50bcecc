"""Follow one face through a video: detect rarely, predict landmarks every frame.

Between detections the previous landmarks are carried to the new frame by the
similarity motion that Lucas-Kanade optical flow of the inner landmarks finds, and the
shape predictor runs in the standard box of the carried landmarks. The detector runs
again on a schedule (first near the tracked face, then on the whole frame) and at once
when the face looks lost: the flow finds no consistent motion, or the new landmarks are
too small, out of the frame, changed size too fast, or have a shape too far from the
one at the last detection. A scheduled detection that misses a face the flow still
follows (a turned head) is retried sooner, and only repeated misses drop the face.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face.detector import DetectorKind, DetectorProcess, FaceBox, FaceDetector
from kfgan_daemon.face.landmarks import PREDICTOR_BOX, LandmarkPredictor, ShapeFrame, shape_residual

logger = logging.getLogger(__name__)

# Full-frame detection runs on a copy whose longer side is at most this many pixels
# (dlib's HOG finds faces from about 80 px, so 720p faces down to ~160 px are found).
AUTO_DETECT_LONG_SIDE = 640
# Near the tracked face, detection runs at a scale that makes the face about this big.
_REGION_FACE_SIDE = 120.0
# The region searched around the tracked face: its box grown by this fraction of its side on each side.
_REGION_MARGIN = 0.6
# Optical flow between frames runs on the face's neighbourhood resized so that the
# face's rigid-landmark scale is about this many pixels (~130 px face width).
_FLOW_FACE_SCALE = 32.0
_FLOW_MARGIN = 1.5  # neighbourhood margin around the inner landmarks, in face scales
_FLOW_POINTS = slice(17, 68)  # brows, nose, eyes, mouth: textured points, unlike the jaw line
_FLOW_MIN_INLIERS = 0.35
# A face does not change size by more than this between two frames; a larger change
# means the shape predictor latched onto the wrong scale and the face must be detected.
_MAX_SCALE_CHANGE = 0.12
# Scheduled detections in a row that may miss a face the flow still follows.
_MAX_MISSED_DETECTIONS = 2

# Where the last update's landmarks came from: "detected" starts a new track (no face
# before, or the followed one was lost), "redetected" is a scheduled detection of the
# followed face, "followed" is optical flow plus the shape predictor.
LandmarkSource = Literal["detected", "redetected", "followed"]


@dataclass
class TrackerStats:
    frames: int = 0
    with_face: int = 0
    detector_runs: int = 0
    full_frame_detections: int = 0
    losses: int = 0


class FaceTracker:
    """Per-stream face tracker: `update(frame)` returns the followed face's 68 landmarks.

    - detector: "hog" (fast, default) or "cnn" (dlib MMOD; seconds per frame on a CPU).
    - redetect_interval: frames between scheduled detections while a face is tracked.
    - detect_scale: resize factor of full-frame detection; None picks one that brings
      the longer side to 640 px (never upscaling).
    - max_shape_residual: landmark shape change (similarity-normalised RMS, see
      `shape_residual`) from the last detection beyond which the face counts as lost.
    - search_interval: while no face is tracked, detect on every n-th frame only.
    - full_frame_detector: a child process for whole-frame searches (see `FaceDetector`).

    When several faces are found, the one overlapping (else nearest) the tracked face is
    followed; with no tracked face, the largest.
    """

    def __init__(
        self,
        detector: DetectorKind = "hog",
        redetect_interval: int = 15,
        detect_scale: float | None = None,
        predictor_path: str | Path | None = None,
        detector_path: str | Path | None = None,
        upsample: int | None = None,
        max_shape_residual: float = 0.35,
        min_face_scale: float = 8.0,
        search_interval: int = 1,
        full_frame_detector: DetectorProcess | None = None,
    ):
        if redetect_interval < 1:
            raise ConfigError(f"redetect_interval must be >= 1, got {redetect_interval}")
        if search_interval < 1:
            raise ValueError(f"search_interval must be >= 1, got {search_interval}")
        if detect_scale is not None and not 0.0 < detect_scale <= 4.0:
            raise ValueError(f"detect_scale must be in (0, 4], got {detect_scale}")
        self.detector = FaceDetector(detector, detector_path, upsample, full_frame_detector)
        self.predictor = LandmarkPredictor(predictor_path)
        self.redetect_interval = int(redetect_interval)
        self.detect_scale = detect_scale
        self.max_shape_residual = float(max_shape_residual)
        self.min_face_scale = float(min_face_scale)
        self.search_interval = int(search_interval)
        self.stats = TrackerStats()
        self.reset()

    def reset(self) -> None:
        """Forget the tracked face; the next update detects afresh."""
        self._landmarks: np.ndarray | None = None
        self._reference: np.ndarray | None = None
        self._previous_gray: np.ndarray | None = None
        self._since_detection = 0
        self._since_search = 0
        self._missed_detections = 0
        self.source: LandmarkSource | None = None

    @property
    def landmarks(self) -> np.ndarray | None:
        """Landmarks returned by the last update (None when no face)."""
        return self._landmarks

    @property
    def face_box(self) -> FaceBox | None:
        """The box the shape predictor would use next (None when no face)."""
        if self._landmarks is None:
            return None
        return PREDICTOR_BOX.box_for(self._landmarks)

    def update(self, luma: np.ndarray) -> np.ndarray | None:
        """68x2 float64 landmarks (x, y) of the followed face in the H x W uint8 picture `luma`
        (a frame's Y plane), or None."""
        gray = _to_gray(luma)
        self.stats.frames += 1
        source: LandmarkSource = "detected"
        if self._landmarks is None:
            self._since_search += 1
            if (self._since_search - 1) % self.search_interval:
                self.source = None
                return None
            landmarks = self._acquire(gray, expected=None)
        else:
            self._since_detection += 1
            expected = self.face_box
            if self._since_detection >= self.redetect_interval:
                source = "redetected"
                landmarks = self._acquire(gray, expected)
                if landmarks is None:
                    self._missed_detections += 1
                    self._since_detection = self.redetect_interval // 2
                    if self._missed_detections <= _MAX_MISSED_DETECTIONS:
                        source = "followed"
                        landmarks = self._follow(gray)
            else:
                source = "followed"
                landmarks = self._follow(gray)
                if landmarks is None:
                    self.stats.losses += 1
                    logger.debug("face lost at frame %d; detecting again", self.stats.frames)
                    source = "detected"
                    landmarks = self._acquire(gray, expected)
        self.source = None if landmarks is None else source
        if landmarks is None:
            if self._landmarks is not None:
                self.reset()
            return None
        self.stats.with_face += 1
        self._previous_gray = gray
        return landmarks

    def _follow(self, gray: np.ndarray) -> np.ndarray | None:
        if self._previous_gray is None or self._previous_gray.shape != gray.shape:
            return None  # the stream changed resolution: nothing to follow from
        moved = _flow_landmarks(self._previous_gray, gray, self._landmarks)
        if moved is None:
            return None
        previous = ShapeFrame.of(self._landmarks)
        landmarks = self.predictor(gray, PREDICTOR_BOX.box_for(moved))
        current = ShapeFrame.of(landmarks)
        if _scale_change(current, previous) > _MAX_SCALE_CHANGE:
            return None
        if not self._plausible(landmarks, gray.shape):
            return None
        if shape_residual(landmarks, self._reference) > self.max_shape_residual:
            return None
        self._landmarks = landmarks
        return landmarks

    def _acquire(self, gray: np.ndarray, expected: FaceBox | None) -> np.ndarray | None:
        boxes: list[FaceBox] = []
        if expected is not None:
            region, scale = _search_region(expected, gray.shape)
            if region is not None:
                boxes = self.detector.detect(gray, scale, region)
                self.stats.detector_runs += 1
        if not boxes:
            boxes = self.detector.detect(gray, self._full_frame_scale(gray.shape))
            self.stats.detector_runs += 1
            self.stats.full_frame_detections += 1
        if not boxes:
            return None
        box = _choose(boxes, expected)
        # Predict in the detector's box, then once more in the standard box of that
        # estimate, so that the result does not carry the detector's box jitter.
        landmarks = self.predictor(gray, box)
        if self._plausible(landmarks, gray.shape):
            landmarks = self.predictor(gray, PREDICTOR_BOX.box_for(landmarks))
        if not self._plausible(landmarks, gray.shape):
            return None
        self._reference = landmarks
        self._landmarks = landmarks
        self._since_detection = 0
        self._since_search = 0
        self._missed_detections = 0
        return landmarks

    def _full_frame_scale(self, shape: tuple[int, ...]) -> float:
        if self.detect_scale is not None:
            return self.detect_scale
        return min(1.0, AUTO_DETECT_LONG_SIDE / max(shape[0], shape[1]))

    def _plausible(self, landmarks: np.ndarray, shape: tuple[int, ...]) -> bool:
        height, width = shape[:2]
        frame = ShapeFrame.of(landmarks)
        if not np.isfinite(frame.scale) or frame.scale < self.min_face_scale:
            return False
        return 0.0 <= frame.cx < width and 0.0 <= frame.cy < height


def _flow_landmarks(previous_gray: np.ndarray, gray: np.ndarray, landmarks: np.ndarray) -> np.ndarray | None:
    """`landmarks` moved from `previous_gray` to `gray` by the similarity transform that
    pyramidal Lucas-Kanade flow of the inner landmarks supports; None when the flow does
    not agree on one (the face is gone, occluded, or blurred beyond tracking)."""
    height, width = gray.shape[:2]
    frame = ShapeFrame.of(landmarks)
    points = landmarks[_FLOW_POINTS]
    margin = _FLOW_MARGIN * frame.scale
    x0 = max(int(points[:, 0].min() - margin), 0)
    y0 = max(int(points[:, 1].min() - margin), 0)
    x1 = min(int(math.ceil(points[:, 0].max() + margin)), width)
    y1 = min(int(math.ceil(points[:, 1].max() + margin)), height)
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None
    factor = min(1.0, _FLOW_FACE_SCALE / frame.scale)
    size = (max(int(round((x1 - x0) * factor)), 1), max(int(round((y1 - y0) * factor)), 1))
    before = cv2.resize(previous_gray[y0:y1, x0:x1], size, interpolation=cv2.INTER_LINEAR)
    after = cv2.resize(gray[y0:y1, x0:x1], size, interpolation=cv2.INTER_LINEAR)
    fx, fy = size[0] / (x1 - x0), size[1] / (y1 - y0)
    start = ((points - (x0, y0)) * (fx, fy)).astype(np.float32).reshape(-1, 1, 2)
    end, status, _ = cv2.calcOpticalFlowPyrLK(
        before, after, start, None, winSize=(15, 15), maxLevel=3,
        criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03),
    )
    tracked = status.ravel() == 1
    if tracked.sum() < _FLOW_MIN_INLIERS * len(points):
        return None
    transform, inliers = cv2.estimateAffinePartial2D(
        start[tracked], end[tracked], method=cv2.RANSAC, ransacReprojThreshold=3.0
    )
    if transform is None or inliers.sum() < _FLOW_MIN_INLIERS * len(points):
        return None
    # Back to frame coordinates: undo the neighbourhood's offset and resize on both sides.
    to_patch = np.array([[fx, 0.0, -x0 * fx], [0.0, fy, -y0 * fy], [0.0, 0.0, 1.0]])
    from_patch = np.linalg.inv(to_patch)
    motion = from_patch @ np.vstack([transform, [0.0, 0.0, 1.0]]) @ to_patch
    return landmarks @ motion[:2, :2].T + motion[:2, 2]


def _scale_change(current: ShapeFrame, previous: ShapeFrame) -> float:
    return abs(math.log(current.scale / previous.scale)) if current.scale > 0 else math.inf


def _to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        # A copy: the tracker keeps the previous frame, and callers may reuse their buffer.
        return np.array(image, dtype=np.uint8, order="C")
    raise ValueError(f"expected an H x W luma plane (DecodedFrame.luma), got shape {image.shape}")


def _search_region(box: FaceBox, shape: tuple[int, ...]) -> tuple[tuple[int, int, int, int] | None, float]:
    height, width = shape[:2]
    side = max(box.width, box.height)
    margin = _REGION_MARGIN * side
    x0 = max(int(box.left - margin), 0)
    y0 = max(int(box.top - margin), 0)
    x1 = min(int(math.ceil(box.right + margin)), width)
    y1 = min(int(math.ceil(box.bottom + margin)), height)
    if x1 - x0 < 16 or y1 - y0 < 16:
        return None, 1.0
    return (x0, y0, x1, y1), min(1.0, _REGION_FACE_SIDE / side)


def _choose(boxes: list[FaceBox], expected: FaceBox | None) -> FaceBox:
    if expected is None:
        return max(boxes, key=lambda b: b.area)
    best = max(boxes, key=expected.iou)
    if expected.iou(best) > 0.0:
        return best
    ex, ey = expected.center
    return min(boxes, key=lambda b: (b.center[0] - ex) ** 2 + (b.center[1] - ey) ** 2)
