"""A compressed video's face tracks, kept so that a later dataset build can replay them.

Tracking (dlib's detector and 68-point predictor on every decoded frame) is most of a
build's time, and dlib with its 100 MB of models is what a machine that only trains
(a lent GPU whose working tree must stay small) does not have. A build given a tracks
folder writes, for each (video, CRF, sender), what the tracker returned on every frame;
a later build with the same folder replays a file whose encode settings match instead
of tracking, and everything after the tracker (smoothing, alignment, keyframe store,
sampling) runs as before: the targets, hq references, landmarks and alignments come out
exactly as the tracking build made them. The compressed crops are those of this build's
own encode, which x264 does not always repeat bit for bit (its threads), so the
landmarks may be those of an encode a few hundredths of a dB away: what alignment needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kfgan_daemon.errors import InputError
from kfgan_daemon.train.npz import open_npz

SUFFIX = ".tracks.npz"
LANDMARKS = "landmarks"  # frames x 68 x 2 float64, NaN on a frame without a face
SOURCES = "sources"  # frames str: the tracker's ``source`` ("" without a face)
SETTINGS = "settings"  # JSON of the encode and tracking settings the tracks belong to


@dataclass
class FaceTracks:
    """What a tracker returned on each frame of one encoded video, in decode order."""

    settings: dict
    landmarks: list[np.ndarray | None] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)

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
                SETTINGS: json.dumps(self.settings),
            },
        )
        partial.replace(path)

    @classmethod
    def load(cls, path: Path) -> FaceTracks:
        with open_npz(path, "face tracks", "delete the file to track afresh") as arrays:
            stacked, sources, settings = arrays[LANDMARKS], arrays[SOURCES], json.loads(str(arrays[SETTINGS]))
        landmarks = [None if np.isnan(frame).any() else frame for frame in stacked]
        return cls(settings, landmarks, [str(source) or None for source in sources])


class ReplayedTracker:
    """Stands in for :class:`kfgan_daemon.face.FaceTracker` in a build: hands out the recorded
    landmarks and ``source`` frame by frame (``update`` ignores the picture)."""

    def __init__(self, tracks: FaceTracks, path: Path) -> None:
        self.tracks = tracks
        self.path = path
        self.source: str | None = None
        self._next = 0

    def update(self, luma: np.ndarray) -> np.ndarray | None:
        index = self._next
        if index >= len(self.tracks.landmarks):
            raise InputError(
                f"{self.path}: the tracks end at frame {index} but the video goes on; delete the file to track afresh"
            )
        self._next += 1
        landmarks = self.tracks.landmarks[index]
        self.source = self.tracks.sources[index]
        return None if landmarks is None else landmarks.copy()

    def finish(self) -> None:
        """Check that the video had as many frames as the tracks (a changed source must be tracked afresh)."""
        if self._next != len(self.tracks.landmarks):
            raise InputError(
                f"{self.path}: the tracks hold {len(self.tracks.landmarks)} frames but the video {self._next}; "
                "delete the file to track afresh"
            )
