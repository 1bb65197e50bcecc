"""Face detection and tracking with the real dlib models, on real faces where ../shared is present."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from kfgan_daemon.errors import ConfigError, FaceModelError
from kfgan_daemon.face import (
    CNN_FACE_DETECTOR,
    SHAPE_PREDICTOR_68,
    FaceDetector,
    FaceTracker,
    LandmarkPredictor,
    locate_dlib_model,
)

CLIP_FRAMES = 45


@pytest.fixture(scope="module")
def d12_frames(media_dir) -> list[np.ndarray]:
    """The decoded Y planes: what the tracker works on."""
    from kfgan_daemon.media import FileSource

    frames = []
    with FileSource(media_dir / "d12.mp4") as source:
        for frame in source:
            frames.append(frame.luma)
            if len(frames) == CLIP_FRAMES:
                break
    return frames


@pytest.fixture(scope="module")
def per_frame_reference(d12_frames) -> dict[int, np.ndarray]:
    """Landmarks from a full detection on every third frame (the expensive way)."""
    detector, predictor = FaceDetector("hog"), LandmarkPredictor()
    reference = {}
    for index in range(0, CLIP_FRAMES, 3):
        gray = d12_frames[index]
        boxes = detector.detect(gray)
        assert boxes, f"no face detected in d12 frame {index}"
        reference[index] = predictor(gray, max(boxes, key=lambda b: b.area))
    return reference


def test_model_files_come_from_face_recognition_models():
    for name in (SHAPE_PREDICTOR_68, CNN_FACE_DETECTOR):
        path = locate_dlib_model(name)
        assert path.is_file() and path.name == name and "face_recognition_models" in str(path)


def test_missing_model_file_says_what_to_pass(tmp_path):
    missing = tmp_path / "nope.dat"
    with pytest.raises(FaceModelError, match="nope.dat"):
        locate_dlib_model(SHAPE_PREDICTOR_68, missing)
    with pytest.raises(FaceModelError):
        FaceTracker(predictor_path=missing)
    with pytest.raises(FaceModelError):
        FaceDetector("cnn", path=missing)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="redetect_interval"):
        FaceTracker(redetect_interval=0)
    with pytest.raises(ValueError):
        FaceTracker().update(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="luma"):
        FaceTracker().update(np.zeros((10, 10, 3), np.uint8))


def test_no_face_returns_none_and_searches_on_schedule():
    tracker = FaceTracker(search_interval=3)
    blank = np.full((360, 640), 128, dtype=np.uint8)
    assert all(tracker.update(blank) is None for _ in range(7))
    assert tracker.stats.detector_runs == 3  # frames 1, 4 and 7
    assert tracker.landmarks is None and tracker.face_box is None


@pytest.mark.shared
def test_tracks_a_real_face_with_few_detections(d12_frames, per_frame_reference):
    tracker = FaceTracker(redetect_interval=15)
    errors = []
    for index, frame in enumerate(d12_frames):
        landmarks = tracker.update(frame)
        assert landmarks is not None and landmarks.shape == (68, 2), f"face lost at frame {index}"
        if index in per_frame_reference:
            errors.append(np.abs(landmarks - per_frame_reference[index]).mean())
    assert tracker.stats.with_face == CLIP_FRAMES
    assert tracker.stats.detector_runs <= CLIP_FRAMES // 5
    assert np.median(errors) < 1.5, errors
    assert max(errors) < 6.0, errors


@pytest.mark.shared
def test_face_that_disappears_is_dropped_and_found_again(d12_frames):
    tracker = FaceTracker(redetect_interval=30)
    for frame in d12_frames[:4]:
        assert tracker.update(frame) is not None
    assert tracker.update(np.full_like(d12_frames[0], 90)) is None
    assert tracker.landmarks is None
    assert tracker.update(d12_frames[4]) is not None


@pytest.mark.shared
def test_largest_face_is_followed(d12_frames):
    frame = d12_frames[0]
    small = cv2.resize(frame, (288, 288), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((512, 512 + 320), dtype=np.uint8)
    canvas[:, :512] = frame
    canvas[112:400, 528:816] = small
    detector = FaceDetector("hog")
    assert len(detector.detect(canvas)) == 2
    tracker = FaceTracker(detect_scale=1.0)
    landmarks = tracker.update(canvas)
    assert landmarks is not None and landmarks[:, 0].max() < 512
    # Following it afterwards: the smaller face never takes over.
    for _ in range(3):
        assert tracker.update(canvas)[:, 0].max() < 512


@pytest.mark.shared
@pytest.mark.slow
def test_cnn_detector_finds_the_face(d12_frames):
    gray = d12_frames[0]
    (hog_box,) = FaceDetector("hog").detect(gray)
    cnn_boxes = FaceDetector("cnn").detect(gray, scale=0.25)
    assert len(cnn_boxes) == 1 and cnn_boxes[0].iou(hog_box) > 0.4


@pytest.mark.shared
def test_resolution_change_detects_again(d12_frames):
    tracker = FaceTracker()
    for frame in d12_frames[:3]:
        tracker.update(frame)
    runs = tracker.stats.detector_runs
    wider = cv2.copyMakeBorder(d12_frames[3], 0, 0, 0, 128, cv2.BORDER_CONSTANT)
    landmarks = tracker.update(wider)
    assert landmarks is not None and tracker.stats.detector_runs > runs
