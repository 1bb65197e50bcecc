"""The one face pipeline: how every path cuts a video's faces, frame by frame.

Track the face (detect rarely, landmarks every frame), steady its landmarks, watch
whose face it is, align the crop, offer an I-frame's crop to the keyframe store,
select the nearest keyframe and warp it onto the face. Serving and ``restore``
(:class:`~kfgan_daemon.restore.stream.StreamRestorer`), ``eval``, ``eval --end-to-end``
(through ``restore``) and ``dataset build`` all run :class:`FacePipeline`, built from
one :class:`RestoreSettings`, so that a model is trained and measured on faces cut as
it is served. What a keyframe entry holds is the one thing they differ in, and one hook
decides it: the decoded crop (serving), the original's crop (the eval's ``hq``
keyframes), or both (the dataset).

The record of these settings (:func:`face_record`) goes into the dataset's manifest
and the model file; :func:`cut_differently` names what a server's settings change
from the faces a model learned on.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, get_args

import numpy as np

from kfgan_daemon.face import (
    CROP_SIZE,
    AlignedFace,
    FaceTracker,
    LandmarkSmoother,
    LandmarkSource,
    OneEuroSettings,
    align_frame,
    landmark_image,
    mls_warp,
)
from kfgan_daemon.face.align import cut_crop
from kfgan_daemon.face.detector import DetectorProcess, FaceBox
from kfgan_daemon.face.identity import FaceDescriber
from kfgan_daemon.keyframes import KeyframeEntry, KeyframeStore
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.restore.identity import DescriptorSource, IdentityWatch
from kfgan_daemon.restore.job import FaceJob
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.restore.timing import StageTimer

log = logging.getLogger(__name__)

K = TypeVar("K")  # what a keyframe entry holds

# The settings that make the faces a model sees: recorded with a dataset and a model.
RECORDED_FIELDS = (
    "detector", "redetect_interval", "alignment", "smooth_landmarks", "smoothing_min_cutoff", "smoothing_beta",
    "identity_check", "identity_distance", "identity_lost_seconds", "keyframe_store_size", "keyframe_policy",
    "warp_mode",
)
# Of those, the ones that change what a face and its reference look like to the generator (the
# others change which frames have a face or a keyframe): a model served with other values gets
# inputs unlike those it learned from.
CONTRACT_FIELDS = (
    "crop_size", "alignment", "smooth_landmarks", "smoothing_min_cutoff", "smoothing_beta", "keyframe_store_size",
    "keyframe_policy", "warp_mode",
)

# Boxes of the face before and after the tracker lost and found it again that overlap this much
# are taken as one face in one place (dlib's HOG boxes of one face overlap by 0.6 or more).
SAME_PLACE_IOU = 0.5


def face_record(settings: RestoreSettings) -> dict[str, Any]:
    """The face settings faces were cut with, as JSON-ready values (model paths are the machine's own)."""
    return {"crop_size": CROP_SIZE, **{name: getattr(settings, name) for name in RECORDED_FIELDS}}


def cut_differently(record: Mapping[str, Any], settings: RestoreSettings) -> list[str]:
    """The contract fields in which ``settings`` differ from ``record`` (a model's), as
    ``name: recorded -> ours``; fields the record lacks are not judged."""
    ours = face_record(settings)
    return [
        f"{name}: {record[name]!r} -> {ours[name]!r}"
        for name in CONTRACT_FIELDS
        if name in record and record[name] != ours[name]
    ]


class LandmarkTracker(Protocol):
    """What the pipeline needs of a tracker: :class:`FaceTracker`, or a dataset's recorded tracks."""

    source: LandmarkSource | None

    @property
    def face_box(self) -> FaceBox | None: ...

    def update(self, luma: np.ndarray) -> np.ndarray | None: ...


def face_tracker(settings: RestoreSettings, full_frame_detector: DetectorProcess | None = None) -> FaceTracker:
    """The tracker ``settings`` ask for."""
    return FaceTracker(
        detector=settings.detector,
        redetect_interval=settings.redetect_interval,
        predictor_path=settings.predictor_path,
        detector_path=settings.detector_path,
        full_frame_detector=full_frame_detector,
    )


def landmark_smoother(settings: RestoreSettings) -> LandmarkSmoother | None:
    """The landmark filter ``settings`` ask for (None: landmarks are used as the tracker gives them)."""
    if not settings.smooth_landmarks:
        return None
    return LandmarkSmoother(OneEuroSettings(settings.smoothing_min_cutoff, settings.smoothing_beta))


@dataclass(slots=True)
class Face:
    """One frame's followed face: its steadied landmarks and aligned crop; with the same frame of
    the uncompressed video (``original``: eval and dataset), the ground truth beside it."""

    frame: DecodedFrame
    landmarks: np.ndarray  # 68x2 float64, frame coordinates, as smoothed
    aligned: AlignedFace
    original: DecodedFrame | None = None
    _truth: np.ndarray | None = field(default=None, repr=False)

    @property
    def truth(self) -> np.ndarray:
        """The original frame cut with this face's matrix (256x256x3 uint8 RGB), cut once."""
        if self.original is None:
            raise ValueError(f"frame {self.frame.index}: no original frame was given to cut the truth from")
        if self._truth is None:
            self._truth = cut_crop(self.original, self.aligned.matrix, self.aligned.crop.shape[0])
        return self._truth


# Which crop of an I-frame a keyframe entry holds, in evaluation and training: the sender's
# original ("hq", what a sender of high-quality I-frames delivers) or the crop as decoded ("stream").
ReferenceMode = Literal["hq", "stream"]
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)


def decoded_crop(face: Face) -> np.ndarray:
    """The default keyframe entry: the I-frame's crop as decoded (what a receiver has)."""
    return face.aligned.crop


@dataclass(slots=True)
class FaceStats:
    keyframes_stored: int = 0
    store_clears: int = 0
    timer: StageTimer = field(default_factory=StageTimer)


@dataclass(frozen=True, slots=True)
class _Keyframe(Generic[K]):
    """An I-frame's entry waiting for its identity check."""

    index: int
    landmarks: np.ndarray
    content: K


class FacePipeline(Generic[K]):
    """Follows one stream's face and keeps its keyframes: ``follow`` each frame in order, then
    ``select`` and ``warp`` (or ``job``) where a reference is wanted.

    ``keyframe_entry`` (the hook) makes what an I-frame's store entry holds from its face.
    ``describer`` answers identity checks: a child process for a live stream (asynchronous,
    never waited for), else :class:`FaceDescriber` inline, the same decisions every run.
    ``tracker`` and ``store`` replace the ones ``settings`` ask for (tests, recorded tracks).
    """

    def __init__(
        self,
        settings: RestoreSettings,
        keyframe_entry: Callable[[Face], K] = decoded_crop,  # type: ignore[assignment]
        *,
        tracker: LandmarkTracker | None = None,
        store: KeyframeStore | None = None,
        describer: DescriptorSource | None = None,
        full_frame_detector: DetectorProcess | None = None,
        stats: FaceStats | None = None,
    ) -> None:
        self.settings = settings
        self.keyframe_entry = keyframe_entry
        self.tracker: LandmarkTracker = tracker or face_tracker(settings, full_frame_detector)
        self.store = store or KeyframeStore(settings.keyframe_store_size, policy=settings.keyframe_policy)
        self.smoother = landmark_smoother(settings)
        if not settings.identity_check:
            describer = None
        elif describer is None:
            describer = FaceDescriber(settings.descriptor_path)
        self.identity: IdentityWatch[_Keyframe[K]] = IdentityWatch(
            describer, settings.identity_lost_seconds, settings.identity_distance
        )
        self.stats = stats or FaceStats()
        # Bumped every time the store is emptied for a new person; jobs carry it.
        self.store_epoch = 0

    @property
    def checking_new_face(self) -> bool:
        """True while a face that appeared afresh waits for its identity check, or a far answer for its
        second look: it may be someone else."""
        return self.identity.checking_new_face

    def follow(self, frame: DecodedFrame, original: DecodedFrame | None = None) -> Face | None:
        """Track, steady and align the face; empty the store when the person changed; ask who an
        I-frame's face, a face found afresh or a doubted face is, the I-frame's entry entering the
        store once known. None: no face in this frame."""
        timer = self.stats.timer
        self._settle_identity()
        previous_box = self.tracker.face_box
        with timer.stage("track"):
            landmarks = self.tracker.update(frame.luma)
        timestamp = stream_time(frame)
        detected = self.tracker.source == "detected"
        if self.smoother is not None:
            landmarks = self.smoother.follow(landmarks, timestamp, new_face=detected)
        if landmarks is None:
            if self.identity.face_missing(timestamp):
                self._clear_store()
            return None
        if self.identity.face_present(timestamp):
            self._clear_store()
        with timer.stage("align"):
            face = Face(frame, landmarks, align_frame(frame, landmarks, mode=self.settings.alignment), original)
        # A descriptor costs 80-180 ms on a CPU core, so it is computed only where the person can
        # have changed unnoticed: a face found afresh, an I-frame about to enter the store, and the
        # frame after a far answer (a second look before the store is emptied: restore.identity).
        if detected or frame.is_keyframe or self.identity.wants_check:
            keyframe = None
            if frame.is_keyframe:
                keyframe = _Keyframe(frame.index, face.aligned.crop_landmarks, self.keyframe_entry(face))
            # Heavy compression makes the tracker lose and find the same face again every few frames
            # (6 times in 40 frames of d12 at CRF 42): a face found where the followed one just was goes
            # on being restored while it is checked; one that appears afresh waits for its answer.
            new_face = detected and not _same_place(previous_box, self.tracker.face_box)
            with timer.stage("identity"):
                self.identity.check(face.aligned.crop, face.aligned.crop_landmarks, keyframe=keyframe, new_face=new_face)
                self._settle_identity()
        return face

    def select(self, face: Face) -> KeyframeEntry | None:
        """The stored keyframe nearest to the face (its use counted, so call it on every frame that
        follows the stream); None with an empty store or while the face may be someone else."""
        with self.stats.timer.stage("select"):
            return None if self.identity.checking_new_face else self.store.select(face.aligned.crop_landmarks)

    def warp(self, entry: KeyframeEntry, face: Face, crop: np.ndarray | None = None) -> np.ndarray:
        """``crop`` (default: the entry's) moved from the entry's landmarks onto the face's (MLS)."""
        return mls_warp(
            entry.crop if crop is None else crop, entry.landmarks, face.aligned.crop_landmarks,
            mode=self.settings.warp_mode,
        )

    def job(self, face: Face, entry: KeyframeEntry | None) -> FaceJob:
        """The generator's inputs for ``face``, with ``entry`` warped onto it as the reference
        (None: the face's own crop, the reference-free ablation, key id -1)."""
        aligned = face.aligned
        with self.stats.timer.stage("warp"):
            reference = aligned.crop if entry is None else self.warp(entry, face)
            marks = landmark_image(aligned.crop_landmarks)
        return FaceJob(
            compressed=aligned.crop,
            reference=reference,
            landmark_image=marks,
            matrix=aligned.matrix,
            crop_landmarks=aligned.crop_landmarks,
            key_id=-1 if entry is None else entry.key_id,
            store_epoch=self.store_epoch,
            quantiser=face.frame.quantiser,
        )

    def nearest_rms(self, crop_landmarks: np.ndarray) -> float | None:
        """Root-mean-square landmark distance (crop pixels) to the nearest stored keyframe; None: empty store."""
        distance = self.store.nearest_distance(crop_landmarks)
        return None if distance is None else distance / math.sqrt(len(crop_landmarks))

    def close(self) -> None:
        """Forget the identity checks still being computed (the stream ended)."""
        self.identity.cancel()

    def _settle_identity(self) -> None:
        """Apply the identity answers that are ready: a new person empties the store; a checked
        I-frame's entry is offered to it."""
        for verdict in self.identity.settle():
            if verdict.changed:
                self._clear_store()
            keyframe = verdict.keyframe
            if keyframe is not None and self.store.offer(keyframe.index, keyframe.landmarks, keyframe.content):
                self.stats.keyframes_stored += 1

    def _clear_store(self) -> None:
        if len(self.store):
            self.store.clear()
            self.stats.store_clears += 1
            log.info("keyframe store emptied: the face changed identity (epoch %d)", self.store_epoch + 1)
        self.store_epoch += 1


def _same_place(before: FaceBox | None, after: FaceBox | None) -> bool:
    return before is not None and after is not None and before.iou(after) >= SAME_PLACE_IOU


def stream_time(frame: DecodedFrame) -> float:
    """Seconds of stream time; frames without timestamps count at 25 per second."""
    time = frame.time
    return time if time is not None else frame.index / 25.0
