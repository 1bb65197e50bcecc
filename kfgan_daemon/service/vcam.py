"""Mirror one live restored stream to a v4l2loopback virtual camera.

Any program that reads a webcam (a conferencing client, OBS) then shows the
restored speaker. One stream owns the camera at a time: the first to produce a
frame; when its session ends, the next stream to produce a frame takes over.
Writes run on one thread and never queue: a frame that arrives while the
previous one is still being written is skipped, so the camera can never slow
the WebRTC path down.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import av

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.webrtc.transformer import WEBRTC_UNTAGGED_COLOUR

if TYPE_CHECKING:
    from kfgan_daemon.media import VirtualCameraSink
    from kfgan_daemon.service.metrics import ServiceMetrics
    from kfgan_daemon.service.sessions import PeerSession
    from kfgan_daemon.webrtc import RestoredVideoTrack

log = logging.getLogger(__name__)


class VirtualCameraMirror:
    def __init__(self, device: str, fps: int, metrics: "ServiceMetrics") -> None:
        self.device = device
        self.fps = fps
        self.metrics = metrics
        self.owner: str | None = None
        self.failed: str | None = None
        self._sink: "VirtualCameraSink | None" = None
        self._busy = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfgan-vcam")

    def offer(self, track: "RestoredVideoTrack", frame: av.VideoFrame, outcome: object) -> None:
        """Called from the event loop for every frame a restored track sends."""
        if self.failed is not None:
            return
        stream_id = track.stream_id
        if self.owner is None:
            self.owner = stream_id
            log.info("virtual camera %s now shows stream %s", self.device, stream_id)
        elif self.owner != stream_id:
            return
        if not self._busy.acquire(blocking=False):
            self.metrics.virtual_camera_skipped.inc()
            return
        self._executor.submit(self._write, frame)

    def describe(self) -> dict[str, object]:
        return {"device": self.device, "owner": self.owner, "error": self.failed}

    def release_session(self, session: "PeerSession") -> None:
        if self.owner is not None and any(track.stream_id == self.owner for track in session.tracks):
            self.owner = None

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _write(self, frame: av.VideoFrame) -> None:
        try:
            # The mirror sees WebRTC pictures: untagged ones are BT.601, as browsers make them.
            decoded = DecodedFrame.from_av(frame, colour=ColourSpace.of(frame, fallback=WEBRTC_UNTAGGED_COLOUR))
            if self._sink is None or (self._sink.width, self._sink.height) != (decoded.width, decoded.height):
                self._open(decoded.width, decoded.height)
            assert self._sink is not None
            self._sink.write(decoded)
            self.metrics.virtual_camera_frames.inc()
        except OutputError as exc:
            # The camera is an extra: report once and keep serving WebRTC.
            self.failed = str(exc)
            log.error("virtual camera disabled: %s", exc)
        except Exception:
            log.exception("virtual camera %s: writing a frame failed", self.device)
        finally:
            self._busy.release()

    def _open(self, width: int, height: int) -> None:
        from kfgan_daemon.media import VirtualCameraSink

        if self._sink is not None:
            self._sink.close()
            self._sink = None
        self._sink = VirtualCameraSink(self.device, width, height, self.fps)
