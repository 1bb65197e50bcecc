"""One stream's restoration state and the per-frame composition of the face, keyframe and model steps.

Everything here is synchronous and works on numpy arrays, so it can be tested
without an event loop; the streaming engine only decides when each step runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kfgan_daemon.face import AlignedFace, FaceTracker, align_face, landmark_image, mls_warp, paste_back
from kfgan_daemon.keyframes import KeyframeStore
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.timing import StageTimer

@dataclass
class RestoreStats:
    frames: int = 0
    restored: int = 0
    passed_through: int = 0
    no_face: int = 0
    no_keyframe: int = 0
    keyframes_seen: int = 0
    keyframes_stored: int = 0
    timer: StageTimer = field(default_factory=StageTimer)

class StreamRestorer:
    """Tracks the speaker of one stream, keeps its keyframes and builds generator jobs."""

    def __init__(
        self,
        settings: RestoreSettings | None = None,
        tracker: FaceTracker | None = None,
        store: KeyframeStore | None = None,
    ) -> None:
        self.settings = settings or RestoreSettings()
        self.tracker = tracker or FaceTracker(
            detector=self.settings.detector,
            redetect_interval=self.settings.redetect_interval,
            predictor_path=self.settings.predictor_path,
            detector_path=self.settings.detector_path,
        )
        self.store = store or KeyframeStore(self.settings.keyframe_store_size, policy=self.settings.keyframe_policy)
        self.stats = RestoreStats()
        self._last_crop_landmarks: np.ndarray | None = None

    @property
    def needs_keyframe(self) -> bool:
        """True when a fresh I-frame would help: no keyframe yet, or none near the current pose."""
        if len(self.store) == 0:
            return True
        if self._last_crop_landmarks is None:
            return False
        distance = self.store.nearest_distance(self._last_crop_landmarks)
        if distance is None:
            return True
        rms = distance / math.sqrt(len(self._last_crop_landmarks))
        return rms > self.settings.pli_distance_threshold

    def prepare(self, frame: DecodedFrame) -> FaceJob | None:
        """Find and align the face, store it if the frame is a keyframe, and build the generator's inputs.

        Returns None when the frame must pass through untouched (no face, or no keyframe yet).
        """
        self.stats.frames += 1
        timer = self.stats.timer
        if frame.is_keyframe:
            self.stats.keyframes_seen += 1
        with timer.stage("track"):
            landmarks = self.tracker.update(frame.image)
        if landmarks is None:
            self._last_crop_landmarks = None
            self.stats.no_face += 1
            self.stats.passed_through += 1
            return None
        with timer.stage("align"):
            aligned = align_face(frame.image, landmarks)
        self._last_crop_landmarks = aligned.crop_landmarks
        if frame.is_keyframe:
            self._offer(frame, aligned)
        with timer.stage("select"):
            entry = self.store.select(aligned.crop_landmarks)
        if entry is None:
            self.stats.no_keyframe += 1
            self.stats.passed_through += 1
            return None
        with timer.stage("warp"):
            reference = mls_warp(entry.crop, entry.landmarks, aligned.crop_landmarks, mode=self.settings.warp_mode)
            marks = landmark_image(aligned.crop_landmarks)
        return FaceJob(
            compressed=aligned.crop,
            reference=reference,
            landmark_image=marks,
            matrix=aligned.matrix,
            crop_landmarks=aligned.crop_landmarks,
            key_id=entry.key_id,
        )

    def observe_keyframe(self, frame: DecodedFrame) -> None:
        """The cheap path for a frame that will not be restored: only I-frames are aligned and stored."""
        if not frame.is_keyframe:
            return
        self.stats.keyframes_seen += 1
        with self.stats.timer.stage("track"):
            landmarks = self.tracker.update(frame.image)
        if landmarks is None:
            return
        self._offer(frame, align_face(frame.image, landmarks))

    def _offer(self, frame: DecodedFrame, aligned: AlignedFace) -> None:
        if self.store.offer(frame.index, aligned.crop_landmarks, aligned.crop):
            self.stats.keyframes_stored += 1

    def complete(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> DecodedFrame:
        """Blend the restored crop back into the frame."""
        with self.stats.timer.stage("paste"):
            image = paste_back(frame.image, restored_crop, job.matrix)
        self.stats.restored += 1
        return frame.with_image(image)

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame:
        """Count a frame the engine decided to send unrestored (overload) and return it unchanged."""
        self.stats.passed_through += 1
        return frame

    def restore(self, frame: DecodedFrame, generator: CropGenerator) -> DecodedFrame:
        """Restore one frame synchronously (the file path, tests and benchmarks)."""
        job = self.prepare(frame)
        if job is None:
            return frame
        with self.stats.timer.stage("generator"):
            (crop,) = generator([job])
        return self.complete(frame, job, crop)
