"""A compressed video's face tracks, kept so that a later dataset build can replay them.

Tracking (dlib's detector and 68-point predictor on every decoded frame) is most of a
build's time, and dlib with its 100 MB of models is what a machine that only trains
(a lent GPU whose working tree must stay small) does not have. A build given a tracks
folder writes, for each (video, CRF, sender), what the tracker returned on every frame
and the identity checks' face descriptors in the order they were asked for; a later
build with the same folder replays a file whose settings match instead of running dlib,
and everything else (smoothing, alignment, identity decisions, keyframe store, sampling)
runs as before: the targets, hq references, landmarks and alignments come out exactly as
the tracking build made them. The compressed crops are those of this build's
own encode, which x264 does not always repeat bit for bit (its threads), so the
landmarks may be those of an encode a few hundredths of a dB away: what alignment needs.
"""
from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kfgan_daemon.errors import InputError
from kfgan_daemon.face.detector import FaceBox
from kfgan_daemon.face.landmarks import PREDICTOR_BOX
from kfgan_daemon.restore.face_pipeline import LandmarkTracker
from kfgan_daemon.restore.identity import DescriptorSource
from kfgan_daemon.train.npz import open_npz

SUFFIX = ".tracks.npz"
LANDMARKS = "landmarks"  # frames x 68 x 2 float64, NaN on a frame without a face
SOURCES = "sources"  # frames str: the tracker's ``source`` ("" without a face)
DESCRIPTORS = "descriptors"  # checks x 128 float64: the identity checks' descriptors in the order asked, NaN: failed
DESCRIPTOR_SIZE = 128  # dlib's face descriptor
SETTINGS = "settings"  # JSON of the encode and face settings the tracks belong to


@dataclass
class FaceTracks:
    """What a tracker returned on each frame of one encoded video, in decode order."""

    settings: dict
    landmarks: list[np.ndarray | None] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)
    descriptors: list[np.ndarray] = field(default_factory=list)

    def record(self, landmarks: np.ndarray | None, source: str | None) -> None:
        self.landmarks.append(None if landmarks is None else np.array(landmarks, dtype=np.float64))
        self.sources.append(None if landmarks is None else source)

    def save(self, path: Path) -> None:
        stacked = np.full((len(self.landmarks), 68, 2), np.nan)
        for index, landmarks in enumerate(self.landmarks):
            if landmarks is not None:
                stacked[index] = landmarks
        partial = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(
            partial,
            **{
                LANDMARKS: stacked,
                SOURCES: np.array([source or "" for source in self.sources], dtype=str),
                DESCRIPTORS: np.array(self.descriptors, dtype=np.float64).reshape(-1, DESCRIPTOR_SIZE),
                SETTINGS: json.dumps(self.settings),
            },
        )
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> FaceTracks:
        with open_npz(path, "face tracks", "delete the file to track afresh") as arrays:
            stacked, sources, settings = arrays[LANDMARKS], arrays[SOURCES], json.loads(str(arrays[SETTINGS]))
            # Tracks kept before identity checks were replayed have none (their settings say so).
            descriptors = list(arrays[DESCRIPTORS]) if DESCRIPTORS in arrays.files else []
        landmarks = [None if np.isnan(frame).any() else frame for frame in stacked]
        return cls(settings, landmarks, [str(source) or None for source in sources], descriptors)


class RecordingTracker:
    """A tracker whose every answer is kept in ``tracks``."""

    def __init__(self, tracker: LandmarkTracker, tracks: FaceTracks) -> None:
        self.tracker = tracker
        self.tracks = tracks

    @property
    def source(self) -> str | None:
        return self.tracker.source

    @property
    def face_box(self) -> FaceBox | None:
        return self.tracker.face_box

    def update(self, luma: np.ndarray) -> np.ndarray | None:
        landmarks = self.tracker.update(luma)
        self.tracks.record(landmarks, self.tracker.source)
        return landmarks


class RecordingDescriber:
    """A describer whose every descriptor is kept in ``tracks``, in the order asked for (its answers
    are ready at once, as a file's must be)."""

    def __init__(self, describer: DescriptorSource, tracks: FaceTracks) -> None:
        self.describer = describer
        self.tracks = tracks

    def describe_async(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> Future[np.ndarray]:
        future = self.describer.describe_async(crop_rgb, crop_landmarks)
        failed = future.exception() is not None
        self.tracks.descriptors.append(np.full(DESCRIPTOR_SIZE, np.nan) if failed else future.result())
        return future


class ReplayedTracker:
    """Stands in for :class:`kfgan_daemon.face.FaceTracker` in a build: hands out the recorded
    landmarks and ``source`` frame by frame (``update`` ignores the picture)."""

    def __init__(self, tracks: FaceTracks, path: Path) -> None:
        self.tracks = tracks
        self.path = path
        self.source: str | None = None
        self._landmarks: np.ndarray | None = None
        self._next = 0

    @property
    def face_box(self) -> FaceBox | None:
        """The box :class:`FaceTracker` gives for the last landmarks handed out (None: no face)."""
        return None if self._landmarks is None else PREDICTOR_BOX.box_for(self._landmarks)

    def update(self, luma: np.ndarray) -> np.ndarray | None:
        index = self._next
        if index >= len(self.tracks.landmarks):
            raise InputError(
                f"{self.path}: the tracks end at frame {index} but the video goes on; delete the file to track afresh"
            )
        self._next += 1
        self._landmarks = self.tracks.landmarks[index]
        self.source = self.tracks.sources[index]
        return None if self._landmarks is None else self._landmarks.copy()

    def finish(self) -> None:
        """Check that the video had as many frames as the tracks (a changed source must be tracked afresh)."""
        if self._next != len(self.tracks.landmarks):
            raise InputError(
                f"{self.path}: the tracks hold {len(self.tracks.landmarks)} frames but the video {self._next}; "
                "delete the file to track afresh"
            )


class ReplayedDescriber:
    """Stands in for the identity check's describer in a build: hands out the recorded
    descriptors in the order they were asked for."""

    def __init__(self, tracks: FaceTracks, path: Path) -> None:
        self.tracks = tracks
        self.path = path
        self._next = 0

    def describe_async(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> Future[np.ndarray]:
        if self._next >= len(self.tracks.descriptors):
            raise InputError(
                f"{self.path}: the tracks hold {len(self.tracks.descriptors)} face descriptors but the build asks "
                "for more; delete the file to track afresh"
            )
        descriptor = self.tracks.descriptors[self._next]
        self._next += 1
        future: Future[np.ndarray] = Future()
        if np.isnan(descriptor).any():
            future.set_exception(InputError(f"{self.path}: this face descriptor failed when it was recorded"))
        else:
            future.set_result(descriptor.copy())
        return future


class Replay(NamedTuple):
    """A kept file's tracker answers and identity descriptors, standing in for dlib in a build."""

    tracker: ReplayedTracker
    describer: ReplayedDescriber

    @classmethod
    def of(cls, tracks: FaceTracks, path: Path) -> Replay:
        return cls(ReplayedTracker(tracks, path), ReplayedDescriber(tracks, path))
