"""The set of stored keyframes a stream's frames are restored with.

Landmarks are compared as whole arrays (Euclidean norm of the difference), so callers
must give every entry landmarks in the same frame of reference: the aligned crop's
landmarks (`AlignedFace.crop_landmarks`), which do not depend on where the face was in
the picture.

Policies when a keyframe arrives and the set is full:

- "lfu" (the paper's): the member with the smallest usage count leaves (ties: the
  lowest position), the newcomer is appended with count 0, then every count is halved;
  the halving also happens when the set is not full. Each selection adds 1 to the
  chosen member's count. A set of one (the "last keyframe" baseline) is the published
  implementation's exception, which its trace shows: the newcomer takes the member's
  place and the count carries on, never halved.
- "max_distance" (the paper's ablation): of the members and the newcomer, the one
  whose removal leaves the most diverse set leaves, so that the set spans as many poses
  as possible. Diversity is the smallest pairwise landmark distance in the set; among
  candidates whose removal gives the same diversity, the one with the smallest total
  distance to the others leaves (the most redundant), then the lowest position, with the
  newcomer counting as the last position. The newcomer may thus be the one dropped.
  Selections still count usage (never halved here), but it plays no part in eviction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from kfgan_daemon.errors import ConfigError

KeyframePolicy = Literal["lfu", "max_distance"]
KEYFRAME_POLICIES: tuple[str, ...] = get_args(KeyframePolicy)


@dataclass
class KeyframeEntry:
    key_id: int
    landmarks: np.ndarray  # float64, the shape given to offer (crop landmarks)
    crop: np.ndarray
    usage: float = 0.0


class KeyframeStore:
    """At most `max_size` keyframes, kept by `policy`, searched by landmark distance."""

    def __init__(self, max_size: int = 10, policy: KeyframePolicy = "lfu"):
        if max_size < 1:
            raise ConfigError(f"keyframe store size must be >= 1, got {max_size}")
        self.max_size = int(max_size)
        self.policy: KeyframePolicy = policy
        self._entries: list[KeyframeEntry] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> tuple[KeyframeEntry, ...]:
        """The members in set order."""
        return tuple(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def offer(self, key_id: int, landmarks: np.ndarray, crop: np.ndarray) -> bool:
        """Offer a new keyframe; returns whether it was stored."""
        points = np.array(landmarks, dtype=np.float64)
        if self._entries and points.shape != self._entries[0].landmarks.shape:
            raise ValueError(
                f"keyframe landmarks of shape {points.shape} do not match the stored {self._entries[0].landmarks.shape}"
            )
        entry = KeyframeEntry(key_id=key_id, landmarks=points, crop=crop)
        if self.policy == "lfu":
            self._offer_lfu(entry)
            return True
        return self._offer_max_distance(entry)

    def select(self, landmarks: np.ndarray) -> KeyframeEntry | None:
        """The member nearest to `landmarks` (ties: lowest position); its usage grows by 1."""
        index = self._nearest(landmarks)
        if index is None:
            return None
        entry = self._entries[index]
        entry.usage += 1.0
        return entry

    def nearest_distance(self, landmarks: np.ndarray) -> float | None:
        """Distance to the nearest member, without counting a use; None when empty."""
        distances = self._distances(landmarks)
        return None if distances is None else float(distances.min())

    def _distances(self, landmarks: np.ndarray) -> np.ndarray | None:
        if not self._entries:
            return None
        points = np.asarray(landmarks, dtype=np.float64)
        stacked = np.stack([entry.landmarks for entry in self._entries])
        if points.shape != stacked.shape[1:]:
            raise ValueError(f"landmarks of shape {points.shape} do not match the stored {stacked.shape[1:]}")
        return np.sqrt(((stacked - points) ** 2).reshape(len(stacked), -1).sum(axis=1))

    def _nearest(self, landmarks: np.ndarray) -> int | None:
        distances = self._distances(landmarks)
        # argmin returns the first minimum: ties go to the lowest position.
        return None if distances is None else int(np.argmin(distances))

    def _offer_lfu(self, entry: KeyframeEntry) -> None:
        if self.max_size == 1 and self._entries:
            entry.usage = self._entries[0].usage
            self._entries[0] = entry
            return
        if len(self._entries) >= self.max_size:
            usages = [member.usage for member in self._entries]
            del self._entries[int(np.argmin(usages))]
        self._entries.append(entry)
        for member in self._entries:
            member.usage /= 2.0

    def _offer_max_distance(self, entry: KeyframeEntry) -> bool:
        if len(self._entries) < self.max_size:
            self._entries.append(entry)
            return True
        candidates = [*self._entries, entry]
        flat = np.stack([member.landmarks.ravel() for member in candidates])
        pairwise = np.sqrt(((flat[:, None, :] - flat[None, :, :]) ** 2).sum(axis=2))
        count = len(candidates)
        best_key: tuple[float, float, int] | None = None
        drop = 0
        for index in range(count):
            keep = [other for other in range(count) if other != index]
            sub = pairwise[np.ix_(keep, keep)]
            diversity = float(sub[np.triu_indices(len(keep), k=1)].min()) if len(keep) > 1 else np.inf
            # Maximise diversity; then drop the most redundant (smallest total distance); then the lowest position.
            key = (-diversity, float(pairwise[index].sum()), index)
            if best_key is None or key < best_key:
                best_key, drop = key, index
        if drop == count - 1:
            return False
        del self._entries[drop]
        self._entries.append(entry)
        return True
