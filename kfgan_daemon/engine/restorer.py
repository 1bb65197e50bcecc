"""A stream's restorer as the engine's threads share it: one face step at a time, its state cached for the event loop.

The restorer is used from executor threads. Its face stage (tracker, keyframe
store: ``prepare``, ``locate``, ``observe_keyframe``) runs under one lock per
stream, so that a slow step of one frame and a step of the next never overlap;
``complete``, ``carry_forward`` and ``remember`` touch only the restorer's
correction and run on the paste executor, where the emit task puts them one at
a time. After every call the state the event loop reads (``needs_keyframe``,
``can_carry``, ``keyframes_stored``) is cached, computed on the thread that
used the restorer, so that the event loop never calls into a restorer a thread
is using.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

if TYPE_CHECKING:
    from kfgan_daemon.media.frame import DecodedFrame
    from kfgan_daemon.restore.job import FaceJob

log = logging.getLogger(__name__)

SkipReason = Literal["no_face", "no_keyframe"]


class FrameRestorer(Protocol):
    """What the engine needs from a stream's restorer (``kfgan_daemon.restore.StreamRestorer``).

    ``prepare`` builds the generator's job, or returns None and says why in
    ``skip_reason``. ``locate`` is the cheap path of a frame that will not be
    restored: it follows the face (offering an I-frame to the keyframe store)
    and returns the frame-to-crop alignment matrix. ``carry_forward`` pastes
    the correction of the last restored frame with a frame's own matrix (None:
    the last followed frame's), or returns None when there is none fit to carry
    (no restored frame yet, a new person, too long ago). ``can_carry_forward``
    says whether there is one. ``remember`` keeps a crop that came too late for
    its own frame as the correction to carry onto the next ones.
    """

    def prepare(self, frame: DecodedFrame) -> FaceJob | None: ...

    @property
    def skip_reason(self) -> SkipReason | None: ...

    def locate(self, frame: DecodedFrame) -> np.ndarray | None: ...

    def observe_keyframe(self, frame: DecodedFrame) -> None: ...

    def complete(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> DecodedFrame: ...

    def carry_forward(self, frame: DecodedFrame, matrix: np.ndarray | None) -> DecodedFrame | None: ...

    def remember(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> None: ...

    @property
    def can_carry_forward(self) -> bool: ...

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame: ...

    @property
    def needs_keyframe(self) -> bool: ...


class GuardedRestorer:
    """One stream's :class:`FrameRestorer`, or the callable that builds it (see :meth:`build`), shared safely.

    Read on the event loop: ``needs_keyframe``, ``can_carry`` (a correction is
    fit to carry forward), ``keyframes_stored``, ``skip_reason`` (why the last
    ``prepare`` returned None) and ``followed_index`` (the last frame whose
    face was followed), each as of the last call.
    """

    def __init__(self, name: str, restorer: FrameRestorer | Callable[[], FrameRestorer]) -> None:
        self.name = name
        self.restorer: FrameRestorer | None = None
        self._builder: Callable[[], FrameRestorer] | None = None
        if callable(getattr(restorer, "prepare", None)):
            self.restorer = restorer  # type: ignore[assignment]
        else:
            self._builder = restorer  # type: ignore[assignment]
        self._face_lock = threading.Lock()
        self.needs_keyframe = True
        self.can_carry = False
        self.keyframes_stored: int | None = None
        self.skip_reason: SkipReason | None = None
        self.followed_index: int | None = None

    @property
    def ready(self) -> bool:
        return self.restorer is not None

    def build(self) -> FrameRestorer:
        """Builds the restorer (on a worker thread: dlib detectors take a quarter of a second); see :meth:`install`."""
        assert self._builder is not None
        return self._builder()

    def install(self, restorer: FrameRestorer) -> None:
        """Starts using what :meth:`build` returned (on the event loop)."""
        self.restorer = restorer
        self._refresh()

    # ---- the face stage: one at a time per stream ---------------------------

    def prepare(self, frame: DecodedFrame) -> FaceJob | None:
        with self._using(face=True) as restorer:
            job = restorer.prepare(frame)
            self.skip_reason = None if job is not None else restorer.skip_reason
            self.followed_index = None if self.skip_reason == "no_face" else frame.index
            return job

    def locate(self, frame: DecodedFrame) -> np.ndarray | None:
        with self._using(face=True) as restorer:
            matrix = restorer.locate(frame)
            self.followed_index = None if matrix is None else frame.index
            return matrix

    def observe_keyframe(self, frame: DecodedFrame) -> None:
        with self._using(face=True) as restorer:
            restorer.observe_keyframe(frame)

    # ---- the correction: the emit task's, one at a time ---------------------

    def complete(self, frame: DecodedFrame, job: FaceJob, crop: np.ndarray) -> DecodedFrame:
        with self._using(face=False) as restorer:
            return restorer.complete(frame, job, crop)

    def carry_forward(self, frame: DecodedFrame, matrix: np.ndarray | None) -> DecodedFrame | None:
        with self._using(face=False) as restorer:
            return restorer.carry_forward(frame, matrix)

    def remember(self, frame: DecodedFrame, job: FaceJob, crop: np.ndarray) -> None:
        with self._using(face=False) as restorer:
            restorer.remember(frame, job, crop)

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame:
        assert self.restorer is not None
        return self.restorer.pass_through(frame)

    def close(self) -> None:
        close_restorer = getattr(self.restorer, "close", None)
        if close_restorer is not None:
            close_restorer()  # its identity checks still queued in the child process are not needed

    @contextmanager
    def _using(self, face: bool) -> Iterator[FrameRestorer]:
        restorer = self.restorer
        assert restorer is not None
        with self._face_lock if face else nullcontext():
            try:
                yield restorer
            finally:
                self._refresh()

    def _refresh(self) -> None:
        """Cache what the event loop may read, computed on the thread that used the restorer."""
        restorer = self.restorer
        if restorer is None:
            return
        try:
            self.needs_keyframe = bool(restorer.needs_keyframe)
            self.can_carry = bool(restorer.can_carry_forward)
        except Exception as exc:
            log.debug("stream %s: reading the restorer's state failed: %r", self.name, exc)
        store = getattr(restorer, "store", None)
        if store is not None:
            self.keyframes_stored = len(store)
