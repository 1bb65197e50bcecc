"""Whose keyframes the store holds, and when that person is gone.

A stream's keyframes must restore the person they were cut from. The store is
emptied when the face has been missing for longer than a set time (whoever comes
back may be someone else), or when a newly detected face's descriptor is far from
the store's person (a cut to another speaker that the tracker followed through).
Descriptors are computed only when the tracker finds a face afresh and when a
keyframe is about to be stored, so the cost is one dlib network run (~70 ms on a
CPU core) per I-frame or new track, not per frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kfgan_daemon.face.identity import FaceDescriber, descriptor_distance


@dataclass(slots=True)
class IdentityStats:
    descriptors: int = 0
    changes: int = 0
    timeouts: int = 0


class IdentityWatch:
    """Keeps the store's person (a running mean of matching descriptors) and says when it changed.

    ``describer`` None skips the descriptor check (only the lost-face timeout applies).
    """

    def __init__(self, describer: FaceDescriber | None, lost_seconds: float, max_distance: float) -> None:
        self.describer = describer
        self.lost_seconds = float(lost_seconds)
        self.max_distance = float(max_distance)
        self.stats = IdentityStats()
        self._identity: np.ndarray | None = None
        self._matches = 0
        self._lost_since: float | None = None
        self._expired = False

    def forget(self) -> None:
        """No person yet: the next described face becomes the store's person."""
        self._identity = None
        self._matches = 0

    def face_missing(self, timestamp: float) -> bool:
        """A frame without a face; True (once) when the face has been gone for longer than ``lost_seconds``."""
        if self._lost_since is None:
            self._lost_since = timestamp
        return self._expire(timestamp)

    def face_present(self, timestamp: float) -> bool:
        """A frame with a face; True when it comes back more than ``lost_seconds`` after it went
        and no frame in between said so (the stream paused, or frames were not looked at)."""
        expired = self._lost_since is not None and self._expire(timestamp)
        self._lost_since = None
        self._expired = False
        return expired

    def _expire(self, timestamp: float) -> bool:
        if self._expired or timestamp - self._lost_since <= self.lost_seconds:
            return False
        self._expired = True
        self.stats.timeouts += 1
        self.forget()
        return True

    def changed(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> bool:
        """Describe the face; True when it is not the store's person (who it then becomes)."""
        if self.describer is None:
            return False
        descriptor = self.describer.describe(crop_rgb, crop_landmarks)
        self.stats.descriptors += 1
        if self._identity is None:
            self._identity, self._matches = descriptor, 1
            return False
        if descriptor_distance(descriptor, self._identity) > self.max_distance:
            self.stats.changes += 1
            self._identity, self._matches = descriptor, 1
            return True
        # A running mean: one odd pose or blurred frame does not define the person.
        self._matches += 1
        self._identity = self._identity + (descriptor - self._identity) / self._matches
        return False
