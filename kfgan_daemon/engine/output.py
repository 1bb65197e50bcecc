"""What leaves a live stream: each frame, in input order, with the one word that says what happened to it."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfgan_daemon.media.frame import DecodedFrame


class Outcome(str, Enum):
    """What happened to a frame that leaves the stream; each word means one thing."""

    RESTORED = "restored"
    CARRIED_FORWARD = "carried_forward"  # too late to restore: the last restored correction, moved with the face
    NO_FACE = "no_face"  # no face in the picture: sent untouched
    NO_KEYFRAME = "no_keyframe"  # a face, but no keyframe to restore it from yet: sent untouched
    SHED = "shed"  # overload: too late to restore and nothing to carry forward, sent unrestored
    ERROR = "error"  # an exception in this frame's processing: sent unrestored


@dataclass(slots=True)
class StreamOutput:
    """One frame leaving a stream, in input order. Times are ``time.monotonic()`` seconds."""

    frame: DecodedFrame
    outcome: Outcome
    arrival: float
    emitted: float = 0.0

    @property
    def latency(self) -> float:
        """Seconds the engine added: from arrival (as given to ``submit``) to the result being ready."""
        return self.emitted - self.arrival
