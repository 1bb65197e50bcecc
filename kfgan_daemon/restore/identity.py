"""Whose keyframes the store holds, and when that person is gone.

A stream's keyframes must restore the person they were cut from. The store is
emptied when the face has been missing for longer than a set time (whoever comes
back may be someone else), or when a newly detected face's descriptor is far from
the store's person (a cut to another speaker that the tracker followed through).
Descriptors are computed only when the tracker finds a face afresh and when a
keyframe is about to be stored, so the cost is one dlib network run (80-180 ms on
a CPU core) per I-frame or new track, not per frame.

The check is asynchronous: :meth:`IdentityWatch.check` asks for a descriptor and
:meth:`IdentityWatch.settle` applies the answers that are ready, in the order they
were asked. A live stream asks a child process (``face.identity.DescriberProcess``)
and never waits; meanwhile an I-frame's crop waits with its check and enters the
store only once its face is known to be the store's person, and a face that
appears afresh restores nothing until its check is answered. A file asks
``FaceDescriber``, whose answers are ready at once: the same decisions, at the
same frames, every run.

One far answer is a doubt, not a change. A crop of a heavily quantised P-frame gives a
noisy descriptor: d12 at CRF 42 (x264 veryfast) has a re-found face 0.75 from the
person, where its I-frames lie within 0.4; taken as a change, that answer emptied the
store and became the person, and the next I-frame, the same person again, emptied it
once more. So a far answer withholds restoration (:attr:`IdentityWatch.checking_new_face`)
and asks for a second look at the next frame with a face (:attr:`IdentityWatch.wants_check`);
only a second far answer empties the store, and the person becomes the mean of the two.
A near second answer drops the doubt and its descriptor. A face waits at most two answers.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from kfgan_daemon.face.identity import descriptor_distance

K = TypeVar("K")

# Which frames the watch asks to have described: changed when that rule changes, so that a dataset's
# recorded descriptors (replayed in the order they were asked for) are recorded afresh.
CHECK_RULE = "keyframes, new faces, a second look at a far answer"


class DescriptorSource(Protocol):
    """Computes face descriptors: ``FaceDescriber`` (at once) or ``DescriberProcess`` (in a child)."""

    def describe_async(self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray) -> Future[np.ndarray]: ...


@dataclass(slots=True)
class Verdict(Generic[K]):
    """An answered check: ``changed`` says the face was not the store's person (who it now is);
    ``keyframe`` is what was held back with the check, now fit to store."""

    changed: bool
    keyframe: K | None


@dataclass(slots=True)
class _Check(Generic[K]):
    future: Future[np.ndarray]
    keyframe: K | None
    new_face: bool


@dataclass(slots=True)
class IdentityStats:
    descriptors: int = 0
    changes: int = 0
    doubts: int = 0  # far answers that the next answer showed to be the same person after all
    timeouts: int = 0
    failed: int = 0


@dataclass(frozen=True, slots=True)
class _Doubt(Generic[K]):
    """A far answer waiting for the next one, with the keyframe held back with its check."""

    descriptor: np.ndarray
    keyframe: K | None


class IdentityWatch(Generic[K]):
    """Keeps the store's person (a running mean of matching descriptors) and says when it changed:
    two answers in a row further than ``max_distance`` from it (see the module's docstring).

    ``describer`` None skips the descriptor check (only the lost-face timeout applies).
    """

    def __init__(self, describer: DescriptorSource | None, lost_seconds: float, max_distance: float) -> None:
        self.describer = describer
        self.lost_seconds = float(lost_seconds)
        self.max_distance = float(max_distance)
        self.stats = IdentityStats()
        self._identity: np.ndarray | None = None
        self._matches = 0
        self._lost_since: float | None = None
        self._expired = False
        self._pending: deque[_Check[K]] = deque()
        self._doubt: _Doubt[K] | None = None

    def forget(self) -> None:
        """No person yet: the next described face becomes the store's person. A doubted face's held
        keyframes are dropped: they were never shown to be anyone's."""
        self._identity = None
        self._matches = 0
        self._doubt = None

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

    @property
    def checking_new_face(self) -> bool:
        """True while the face may be someone else: from the check of a face that appeared afresh
        until its answer is applied, and from a far answer until the next answer settles the doubt."""
        return self._doubt is not None or any(check.new_face for check in self._pending)

    @property
    def wants_check(self) -> bool:
        """True when a far answer waits for a second look and none is being computed: check the next
        frame's face (whatever its kind), so that the doubt lasts one answer, not until an I-frame."""
        return self._doubt is not None and not self._pending

    def check(
        self, crop_rgb: np.ndarray, crop_landmarks: np.ndarray, *, keyframe: K | None = None, new_face: bool = False
    ) -> None:
        """Ask who this face is; ``keyframe`` (an I-frame's crop) is held until the answer. Without a
        describer the keyframe is released at the next :meth:`settle` unchecked."""
        if self.describer is None:
            future: Future[np.ndarray] = Future()
            future.set_result(np.zeros(0))
        else:
            future = self.describer.describe_async(crop_rgb, crop_landmarks)
        self._pending.append(_Check(future, keyframe, new_face))

    def settle(self) -> list[Verdict[K]]:
        """The answered checks, oldest first, applied to the store's person. A far answer releases
        nothing until the next answer settles its doubt. A check that failed (the child process died)
        releases nothing and changes nothing: its keyframe is not stored."""
        verdicts: list[Verdict[K]] = []
        while self._pending and self._pending[0].future.done():
            check = self._pending.popleft()
            if self.describer is None:
                verdicts.append(Verdict(False, check.keyframe))
                continue
            try:
                descriptor = check.future.result()
            except Exception:
                self.stats.failed += 1
                continue
            verdicts.extend(self._judge(descriptor, check.keyframe))
        return verdicts

    def cancel(self) -> None:
        """Forget the checks not yet answered (the stream is closing)."""
        for check in self._pending:
            check.future.cancel()
        self._pending.clear()

    def _judge(self, descriptor: np.ndarray, keyframe: K | None) -> list[Verdict[K]]:
        """Apply one answer: the verdicts it releases, oldest keyframe first (none while it opens a doubt)."""
        self.stats.descriptors += 1
        if self._identity is None:
            self._identity, self._matches = descriptor, 1
            return [Verdict(False, keyframe)]
        far = descriptor_distance(descriptor, self._identity) > self.max_distance
        doubt, self._doubt = self._doubt, None
        if far and doubt is None:
            self._doubt = _Doubt(descriptor, keyframe)
            return []
        held = [kept for kept in (None if doubt is None else doubt.keyframe, keyframe) if kept is not None]
        if far:
            # A second far look confirms it: another person, described by both looks.
            self.stats.changes += 1
            self._identity, self._matches = (doubt.descriptor + descriptor) / 2, 2
            released = [Verdict(False, kept) for kept in held] or [Verdict(False, None)]
            released[0].changed = True  # the store is emptied before the new person's keyframes enter it
            return released
        if doubt is not None:
            self.stats.doubts += 1  # the far look was noise: it does not enter the mean
        # A running mean: one odd pose or blurred frame does not define the person.
        self._matches += 1
        self._identity = self._identity + (descriptor - self._identity) / self._matches
        return [Verdict(False, kept) for kept in held] or [Verdict(False, None)]
