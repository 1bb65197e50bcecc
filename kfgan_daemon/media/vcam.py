"""Restored video as a webcam: a v4l2loopback device fed through pyvirtualcam.

pyvirtualcam is an optional extra (``pip install 'kfgan-daemon[vcam]'``). Frames
are sent as they come: the live source sets the pace, so the sink never sleeps.
The planes go to the device as I420 unconverted when they are BT.601 limited
range, what V4L2 readers assume for an untagged YUV camera; other colour spaces
are converted to it exactly (:mod:`kfgan_daemon.media.colour`).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.colour import ColourSpace, convert_planes
from kfgan_daemon.media.frame import DecodedFrame

log = logging.getLogger(__name__)

_MODULE_DIR = Path("/sys/module/v4l2loopback")
CAMERA_COLOUR = ColourSpace("bt601", full_range=False)
_LOAD_HINT = "sudo modprobe v4l2loopback devices=1 video_nr={number} exclusive_caps=1 card_label=kfgan"


class VirtualCameraSink:
    """Writes frames as I420 to a v4l2loopback device such as ``/dev/video10`` (even sizes)."""

    def __init__(self, device: str | os.PathLike[str], width: int, height: int, fps: float) -> None:
        self.device = str(device)
        self.width = width
        self.height = height
        self.fps = float(fps)
        self.frames_written = 0
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise OutputError(f"{self.device}: an I420 camera needs an even, positive size, not {width}x{height}")
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise OutputError(
                f"{self.device}: virtual camera output needs pyvirtualcam: pip install 'kfgan-daemon[vcam]'"
            ) from exc
        self._check_device()
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, self.fps, fmt=pyvirtualcam.PixelFormat.I420, device=self.device, backend="v4l2loopback"
            )
        except (RuntimeError, ValueError, OSError) as exc:
            reason = " ".join(str(exc).split())
            raise OutputError(f"{self.device}: cannot open as a v4l2loopback camera ({reason})") from exc
        log.info("virtual camera %s open at %dx%d, %.2f fps", self.device, width, height, self.fps)

    def _check_device(self) -> None:
        if os.path.exists(self.device):
            return
        number = "".join(ch for ch in Path(self.device).name if ch.isdigit()) or "10"
        hint = _LOAD_HINT.format(number=number)
        if not _MODULE_DIR.exists():
            raise OutputError(f"{self.device} does not exist and the v4l2loopback kernel module is not loaded: {hint}")
        raise OutputError(
            f"{self.device} does not exist; v4l2loopback is loaded with other devices "
            f"(see /sys/devices/virtual/video4linux), or reload it: {hint}"
        )

    def write(self, frame: DecodedFrame) -> None:
        if (frame.width, frame.height) != (self.width, self.height):
            raise OutputError(
                f"{self.device}: frame is {frame.width}x{frame.height}, "
                f"the camera was opened for {self.width}x{self.height}"
            )
        planes = convert_planes(*frame.planes, frame.colour, CAMERA_COLOUR)
        try:
            self._camera.send(np.concatenate([plane.ravel() for plane in planes]))
        except (RuntimeError, ValueError, OSError) as exc:
            raise OutputError(f"{self.device}: sending a frame failed ({exc})") from exc
        self.frames_written += 1

    def close(self) -> None:
        self._camera.close()

    def __enter__(self) -> "VirtualCameraSink":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
