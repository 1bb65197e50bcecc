"""One stream's restoration state and the per-frame composition of the face, keyframe and model steps.

Everything here is synchronous and works on numpy arrays, so it can be tested
without an event loop; the streaming engine only decides when each step runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from kfgan_daemon.face import CROP_SIZE, paste_face
from kfgan_daemon.face.detector import DetectorProcess
from kfgan_daemon.face.native_detail import NativeDetailFilter
from kfgan_daemon.face.paste import PasteMode, native_detail_delta, paste_box
from kfgan_daemon.keyframes import KeyframeStore
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.face_pipeline import Face, FacePipeline, FaceStats, LandmarkTracker, stream_time
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.restore.identity import DescriptorSource, IdentityWatch
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.repeats import EmittedFrame, settle_repeated_pixels
from kfgan_daemon.restore.settings import RestoreSettings

SkipReason = Literal["no_face", "no_keyframe"]


@dataclass(frozen=True, slots=True)
class _Correction:
    """What the last restored frame changed, kept to carry onto frames that cannot be restored in time."""

    restored: np.ndarray  # RGB crops
    compressed: np.ndarray
    store_epoch: int
    time: float  # stream seconds


@dataclass(slots=True)
class RestoreStats(FaceStats):
    """The face pipeline's counts and stage times, and what became of each frame."""

    frames: int = 0
    restored: int = 0
    passed_through: int = 0
    no_face: int = 0
    no_keyframe: int = 0
    keyframes_seen: int = 0
    carried_forward: int = 0
    shed: int = 0  # too late to restore, nothing to carry (live engine only); passed_through: no face/keyframe


class StreamRestorer:
    """Tracks the speaker of one stream, keeps its keyframes and builds generator jobs."""

    def __init__(
        self,
        settings: RestoreSettings | None = None,
        tracker: LandmarkTracker | None = None,
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
        self.stats = RestoreStats()
        # The live engine passes a DescriberProcess (descriptors off the frame path); files describe at once.
        self.faces: FacePipeline[np.ndarray] = FacePipeline(
            self.settings, tracker=tracker, store=store, describer=describer,
            full_frame_detector=full_frame_detector, stats=self.stats,
        )
        self._last_crop_landmarks: np.ndarray | None = None
        # Why the last prepare() returned None.
        self.skip_reason: SkipReason | None = None
        self._correction: _Correction | None = None
        # The alignment of the last frame whose face was followed (None: no face there).
        self._last_matrix: np.ndarray | None = None
        # The last frame that left through complete, carry_forward, pass_through or restore.
        self._emitted: EmittedFrame | None = None

    @property
    def tracker(self) -> LandmarkTracker:
        return self.faces.tracker

    @property
    def store(self) -> KeyframeStore:
        return self.faces.store

    @property
    def identity(self) -> IdentityWatch:
        return self.faces.identity

    @property
    def store_epoch(self) -> int:
        """Bumped every time the store is emptied for a new person; jobs carry it."""
        return self.faces.store_epoch

    @property
    def needs_keyframe(self) -> bool:
        """True when a fresh I-frame would help: no keyframe yet, or none near the current pose."""
        if len(self.store) == 0:
            return True
        if self._last_crop_landmarks is None:
            return False
        rms = self.faces.nearest_rms(self._last_crop_landmarks)
        return rms is None or rms > self.settings.pli_distance_threshold

    def prepare(self, frame: DecodedFrame) -> FaceJob | None:
        """Find and align the face, store it if the frame is a keyframe, and build the generator's inputs.

        Returns None when the frame must pass through untouched (no face, or no keyframe yet); it is
        then what goes out for this frame.
        """
        face = self._follow(frame)
        if face is None:
            self.stats.no_face += 1
            self.stats.passed_through += 1
            self.skip_reason = "no_face"
            self._sent(frame, frame)
            return None
        entry = self.faces.select(face)
        if entry is None:
            self.stats.no_keyframe += 1
            self.stats.passed_through += 1
            self.skip_reason = "no_keyframe"
            self._sent(frame, frame)
            return None
        self.skip_reason = None
        return self.faces.job(face, entry)

    def observe_keyframe(self, frame: DecodedFrame) -> None:
        """The cheap path for a frame that will not be restored: only I-frames are aligned and stored."""
        if not frame.is_keyframe:
            return
        self.stats.keyframes_seen += 1
        self.faces.follow(frame)

    def locate(self, frame: DecodedFrame) -> np.ndarray | None:
        """The cheap path of a frame that will not be restored: follow the face (an I-frame is
        offered to the store) and return its frame -> crop matrix, or None without a face (the
        frame then goes out untouched)."""
        face = self._follow(frame)
        if face is None:
            self._sent(frame, frame)
            return None
        return face.aligned.matrix

    def _follow(self, frame: DecodedFrame) -> Face | None:
        """Count the frame, follow the face (an I-frame's crop is offered to the store) and remember where it is."""
        self.stats.frames += 1
        if frame.is_keyframe:
            self.stats.keyframes_seen += 1
        face = self.faces.follow(frame)
        self._last_crop_landmarks = None if face is None else face.aligned.crop_landmarks
        self._last_matrix = None if face is None else face.aligned.matrix
        return face

    def close(self) -> None:
        """Forget the identity checks still being computed (the stream ended)."""
        self.faces.close()

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
