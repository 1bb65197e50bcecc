"""One stream's restoration state and the per-frame composition of the face, keyframe and model steps.

Everything here is synchronous and works on numpy arrays, so it can be tested
without an event loop; the streaming engine only decides when each step runs.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np

from kfgan_daemon.face import (
    CROP_SIZE,
    AlignedFace,
    FaceTracker,
    LandmarkSmoother,
    OneEuroSettings,
    align_frame,
    landmark_image,
    mls_warp,
    paste_face,
)
from kfgan_daemon.face.detector import DetectorProcess, FaceBox
from kfgan_daemon.face.identity import FaceDescriber
from kfgan_daemon.face.native_detail import NativeDetailFilter
from kfgan_daemon.face.paste import PasteMode, native_detail_delta, paste_box
from kfgan_daemon.keyframes import KeyframeStore
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.identity import DescriptorSource, IdentityWatch
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.repeats import EmittedFrame, settle_repeated_pixels
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.timing import StageTimer

log = logging.getLogger(__name__)

SkipReason = Literal["no_face", "no_keyframe"]


@dataclass(frozen=True, slots=True)
class _Correction:
    """What the last restored frame changed, kept to carry onto frames that cannot be restored in time."""

    restored: np.ndarray  # RGB crops
    compressed: np.ndarray
    store_epoch: int
    time: float  # stream seconds


class _Keyframe(NamedTuple):
    """An I-frame's crop waiting for its identity check, in ``KeyframeStore.offer``'s argument order."""

    index: int
    landmarks: np.ndarray
    crop: np.ndarray


@dataclass
class RestoreStats:
    frames: int = 0
    restored: int = 0
    passed_through: int = 0
    no_face: int = 0
    no_keyframe: int = 0
    keyframes_seen: int = 0
    keyframes_stored: int = 0
    store_clears: int = 0
    carried_forward: int = 0
    shed: int = 0  # too late to restore, nothing to carry (live engine only); passed_through: no face/keyframe
    timer: StageTimer = field(default_factory=StageTimer)

class StreamRestorer:
    """Tracks the speaker of one stream, keeps its keyframes and builds generator jobs."""

    def __init__(
        self,
        settings: RestoreSettings | None = None,
        tracker: FaceTracker | None = None,
        store: KeyframeStore | None = None,
        native_detail: NativeDetailFilter | None = None,
        describer: DescriptorSource | None = None,
        full_frame_detector: DetectorProcess | None = None,
    ) -> None:
        """``describer`` and ``full_frame_detector`` (child processes, the live engine's) keep dlib's
        long runs off this process's GIL; without them they run in the calling thread."""
        self.settings = settings or RestoreSettings()
        # The generator's filter for a close-up's own detail band (see face.native_detail).
        self.native_detail = native_detail
        self.tracker = tracker or FaceTracker(
            detector=self.settings.detector,
            redetect_interval=self.settings.redetect_interval,
            predictor_path=self.settings.predictor_path,
            detector_path=self.settings.detector_path,
            full_frame_detector=full_frame_detector,
        )
        self.store = store or KeyframeStore(self.settings.keyframe_store_size, policy=self.settings.keyframe_policy)
        self.stats = RestoreStats()
        self.smoother = landmark_smoother(self.settings)
        # The live engine passes a DescriberProcess (descriptors off the frame path); files describe at once.
        if not self.settings.identity_check:
            describer = None
        elif describer is None:
            describer = FaceDescriber(self.settings.descriptor_path)
        self.identity: IdentityWatch[_Keyframe] = IdentityWatch(
            describer, self.settings.identity_lost_seconds, self.settings.identity_distance
        )
        # Bumped every time the store is emptied for a new person; jobs carry it.
        self.store_epoch = 0
        self._last_crop_landmarks: np.ndarray | None = None
        # Why the last prepare() returned None.
        self.skip_reason: SkipReason | None = None
        self._correction: _Correction | None = None
        # The alignment of the last frame whose face was followed (None: no face there).
        self._last_matrix: np.ndarray | None = None
        # The last frame that left through complete, carry_forward, pass_through or restore.
        self._emitted: EmittedFrame | None = None

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

        Returns None when the frame must pass through untouched (no face, or no keyframe yet); it is
        then what goes out for this frame.
        """
        timer = self.stats.timer
        aligned = self._follow(frame)
        if aligned is None:
            self.stats.no_face += 1
            self.stats.passed_through += 1
            self.skip_reason = "no_face"
            self._sent(frame, frame)
            return None
        with timer.stage("select"):
            entry = None if self.identity.checking_new_face else self.store.select(aligned.crop_landmarks)
        if entry is None:
            self.stats.no_keyframe += 1
            self.stats.passed_through += 1
            self.skip_reason = "no_keyframe"
            self._sent(frame, frame)
            return None
        self.skip_reason = None
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
            store_epoch=self.store_epoch,
            quantiser=frame.quantiser,
        )

    def observe_keyframe(self, frame: DecodedFrame) -> None:
        """The cheap path for a frame that will not be restored: only I-frames are aligned and stored."""
        if not frame.is_keyframe:
            return
        self.stats.keyframes_seen += 1
        self._locate(frame)

    def locate(self, frame: DecodedFrame) -> np.ndarray | None:
        """The cheap path of a frame that will not be restored: follow the face (an I-frame is
        offered to the store) and return its frame -> crop matrix, or None without a face (the
        frame then goes out untouched)."""
        aligned = self._follow(frame)
        if aligned is None:
            self._sent(frame, frame)
            return None
        return aligned.matrix

    def _follow(self, frame: DecodedFrame) -> AlignedFace | None:
        """Count the frame, locate the face, remember where it is, and offer an I-frame's crop to the store."""
        self.stats.frames += 1
        if frame.is_keyframe:
            self.stats.keyframes_seen += 1
        aligned = self._locate(frame)
        self._last_crop_landmarks = None if aligned is None else aligned.crop_landmarks
        self._last_matrix = None if aligned is None else aligned.matrix
        return aligned

    def _locate(self, frame: DecodedFrame) -> AlignedFace | None:
        """Track, steady and align the face; empty the store when the person changed; ask who an
        I-frame's face or a face found afresh is, the I-frame's crop entering the store once known."""
        timer = self.stats.timer
        self._settle_identity()
        previous_box = self.tracker.face_box
        with timer.stage("track"):
            landmarks = self.tracker.update(frame.luma)
        timestamp = stream_time(frame)
        if self.smoother is not None:
            landmarks = self.smoother.follow(landmarks, timestamp, new_face=self.tracker.source == "detected")
        if landmarks is None:
            if self.identity.face_missing(timestamp):
                self._clear_store()
            return None
        if self.identity.face_present(timestamp):
            self._clear_store()
        with timer.stage("align"):
            aligned = align_frame(frame, landmarks, mode=self.settings.alignment)
        # A descriptor costs 80-180 ms on a CPU core, so it is computed only where the person can
        # have changed unnoticed: a face found afresh, and an I-frame about to enter the store.
        detected = self.tracker.source == "detected"
        if detected or frame.is_keyframe:
            keyframe = _Keyframe(frame.index, aligned.crop_landmarks, aligned.crop) if frame.is_keyframe else None
            # Heavy compression makes the tracker lose and find the same face again every few frames
            # (6 times in 40 frames of d12 at CRF 42): a face found where the followed one just was goes
            # on being restored while it is checked; one that appears afresh waits for its answer.
            new_face = detected and not _same_place(previous_box, self.tracker.face_box)
            with timer.stage("identity"):
                self.identity.check(aligned.crop, aligned.crop_landmarks, keyframe=keyframe, new_face=new_face)
                self._settle_identity()
        return aligned

    def _settle_identity(self) -> None:
        """Apply the identity answers that are ready: a new person empties the store; a checked
        I-frame's crop is offered to it."""
        for verdict in self.identity.settle():
            if verdict.changed:
                self._clear_store()
            if verdict.keyframe is not None and self.store.offer(*verdict.keyframe):
                self.stats.keyframes_stored += 1

    def close(self) -> None:
        """Forget the identity checks still being computed (the stream ended)."""
        self.identity.cancel()

    def _clear_store(self) -> None:
        if len(self.store):
            self.store.clear()
            self.stats.store_clears += 1
            log.info("keyframe store emptied: the face changed identity (epoch %d)", self.store_epoch + 1)
        self.store_epoch += 1

    def complete(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> DecodedFrame:
        """Paste the restored crop back into a copy of the frame (only the pixels under the mask change)."""
        detail = self._native_detail(frame, job.matrix) if self.settings.paste_mode == "correction" else None
        with self.stats.timer.stage("paste"):
            restored = paste_restored(
                frame, restored_crop, job.matrix, job.compressed, self.settings, self._emitted,
                luma_detail=detail,
            )
        self._sent(frame, restored)
        self.stats.restored += 1
        self._correction = _Correction(restored_crop, job.compressed, job.store_epoch, stream_time(frame))
        return restored

    def _carriable_correction(self) -> _Correction | None:
        """The last restored correction, if it is of the store's person and no face that appeared
        afresh is waiting for its identity check (its age is judged by each caller)."""
        correction = self._correction
        if correction is None or correction.store_epoch != self.store_epoch or self.identity.checking_new_face:
            return None
        return correction

    def remember(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> None:
        """Keep a crop that was restored too late to be pasted into its own frame as the correction
        to carry onto the next frames (unless a newer one is kept already)."""
        correction = self._correction
        time = stream_time(frame)
        if correction is None or correction.store_epoch != job.store_epoch or correction.time < time:
            self._correction = _Correction(restored_crop, job.compressed, job.store_epoch, time)

    @property
    def can_carry_forward(self) -> bool:
        """True when a restored frame's correction is there to carry and will be for a while yet: it is
        of this person, and the last frame that left was at most half of ``carry_forward_seconds`` after
        it. Past that the live engine restores the next frame it can instead of planning a carry, so that
        a stream restored sparsely never runs out of correction and alternates with unrestored frames."""
        correction = self._carriable_correction()
        if correction is None:
            return False
        emitted = self._emitted
        if emitted is None:
            return True
        return stream_time(emitted.input) - correction.time <= self.settings.carry_forward_seconds / 2

    def carry_forward(self, frame: DecodedFrame, matrix: np.ndarray | None = None) -> DecodedFrame | None:
        """A copy of ``frame`` with the last restored frame's correction pasted at this frame's face
        (``matrix``, frame -> crop), or None when there is none fit to carry: no restored frame yet,
        another person since, or older than ``settings.carry_forward_seconds`` of stream time.

        The correction (restored minus compressed crop) lives in crop space, so the alignment
        moves it with the face; it is always pasted as a correction, whatever ``paste_mode``:
        an old restored face pasted whole would show the old expression. Without ``matrix``
        (no time to follow this frame's face) the last followed frame's alignment is used.
        """
        correction = self._carriable_correction()
        if matrix is None:
            matrix = self._last_matrix
        if correction is None or matrix is None:
            return None
        if abs(stream_time(frame) - correction.time) > self.settings.carry_forward_seconds:
            return None
        detail = self._native_detail(frame, matrix)
        with self.stats.timer.stage("carry_forward"):
            carried = paste_restored(
                frame, correction.restored, matrix, correction.compressed, self.settings, self._emitted, "correction",
                detail,
            )
        self.stats.carried_forward += 1
        return self._sent(frame, carried)

    def _native_detail(self, frame: DecodedFrame, matrix: np.ndarray) -> np.ndarray | None:
        """The model's native detail for the face at ``matrix`` (None: no filter, or no face
        larger than the crop), timed as a stage of its own."""
        if self.native_detail is None:
            return None
        with self.stats.timer.stage("native_detail"):
            return native_detail_delta(frame, matrix, (CROP_SIZE, CROP_SIZE), self.native_detail)

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame:
        """Count a frame the engine sent unrestored because it was too late, with nothing to carry
        forward ("shed"), and return it unchanged."""
        self.stats.shed += 1
        return self._sent(frame, frame)

    def _sent(self, frame: DecodedFrame, output: DecodedFrame) -> DecodedFrame:
        """Remember what went out for ``frame``: the next frame's repeated pixels settle against it.
        The live engine pastes on several threads, so an earlier frame may report after a later one."""
        emitted = self._emitted
        if emitted is None or frame.index > emitted.input.index:
            self._emitted = EmittedFrame(frame, output)
        return output

    def restore(self, frame: DecodedFrame, generator: CropGenerator) -> DecodedFrame:
        """Restore one frame synchronously (the file path, tests and benchmarks)."""
        job = self.prepare(frame)
        if job is None:
            return frame
        with self.stats.timer.stage("generator"):
            (crop,) = generator([job])
        return self.complete(frame, job, crop)


def paste_restored(
    frame: DecodedFrame,
    restored_crop: np.ndarray,
    matrix: np.ndarray,
    compressed: np.ndarray,
    settings: RestoreSettings,
    previous: EmittedFrame | None,
    mode: PasteMode | None = None,
    luma_detail: np.ndarray | None = None,
) -> DecodedFrame:
    """The frame a restorer sends for ``restored_crop``: pasted as ``settings`` say (``mode``
    overrides their paste mode; ``luma_detail`` is the model's native detail, see
    :func:`kfgan_daemon.face.paste.native_detail_delta`), then its repeated pixels settled
    against ``previous``, what was sent for the frame before (see
    :mod:`kfgan_daemon.restore.repeats`)."""
    pasted = paste_face(
        frame,
        restored_crop,
        matrix,
        compressed=compressed,
        mode=mode or settings.paste_mode,
        mask=settings.paste_mask,
        luma_detail=luma_detail,
    )
    box = paste_box(matrix, restored_crop.shape[:2], frame.width, frame.height)
    return settle_repeated_pixels(frame, pasted, previous, box, settings.repeat_update)


def landmark_smoother(settings: RestoreSettings) -> LandmarkSmoother | None:
    """The landmark filter ``settings`` ask for (None: landmarks are used as the tracker gives them)."""
    if not settings.smooth_landmarks:
        return None
    return LandmarkSmoother(OneEuroSettings(settings.smoothing_min_cutoff, settings.smoothing_beta))


# Boxes of the face before and after the tracker lost and found it again that overlap this much
# are taken as one face in one place (dlib's HOG boxes of one face overlap by 0.6 or more).
SAME_PLACE_IOU = 0.5


def _same_place(before: FaceBox | None, after: FaceBox | None) -> bool:
    return before is not None and after is not None and before.iou(after) >= SAME_PLACE_IOU


def stream_time(frame: DecodedFrame) -> float:
    """Seconds of stream time; frames without timestamps count at 25 per second."""
    time = frame.time
    return time if time is not None else frame.index / 25.0
