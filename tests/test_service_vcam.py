"""The virtual camera mirror: one owner at a time, never blocking WebRTC, and a missing device reported, not fatal."""
from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import av
import numpy as np
import pytest

from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.service.metrics import ServiceMetrics
from kfgan_daemon.service.vcam import VirtualCameraMirror
from test_webrtc_loopback import ClientPeer, PatternTrack, start_daemon, stop_daemon, wait_for

MISSING_DEVICE = "/dev/video63"


class RecordingCamera:
    """Stands in for a v4l2loopback device, which this machine cannot load."""

    opened: list["RecordingCamera"] = []
    delay = 0.0

    def __init__(self, device: str, width: int, height: int, fps: float) -> None:
        self.device, self.width, self.height, self.fps = device, width, height, fps
        self.images: list[np.ndarray] = []
        self.closed = False
        RecordingCamera.opened.append(self)

    def write(self, frame) -> None:
        time.sleep(self.delay)
        self.images.append(frame.luma)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def camera(monkeypatch: pytest.MonkeyPatch):
    import kfgan_daemon.media as media

    RecordingCamera.opened = []
    RecordingCamera.delay = 0.0
    monkeypatch.setattr(media, "VirtualCameraSink", RecordingCamera)
    return RecordingCamera


def picture(width: int, height: int, value: int) -> av.VideoFrame:
    chroma = np.full((height // 2, width // 2), 128, np.uint8)
    luma = np.full((height, width), value, np.uint8)
    return DecodedFrame(luma, chroma, chroma.copy(), ColourSpace("bt601")).to_av()


def track(stream_id: str):
    return SimpleNamespace(stream_id=stream_id)


def settle(mirror: VirtualCameraMirror) -> None:
    # The single writer thread has finished when the busy lock can be taken.
    assert mirror._busy.acquire(timeout=5)
    mirror._busy.release()


def test_first_stream_owns_the_camera_until_its_session_ends(camera) -> None:
    metrics = ServiceMetrics()
    mirror = VirtualCameraMirror("/dev/video10", 30, metrics)
    a, b = track("s1-v1"), track("s2-v1")
    mirror.offer(a, picture(64, 48, 10), None)
    settle(mirror)
    mirror.offer(b, picture(64, 48, 20), None)  # not the owner: ignored
    settle(mirror)
    (device,) = camera.opened
    assert [int(image[0, 0]) for image in device.images] == [10]
    assert (device.device, device.width, device.height, device.fps) == ("/dev/video10", 64, 48, 30)

    mirror.release_session(SimpleNamespace(tracks=[a]))
    mirror.offer(b, picture(64, 48, 30), None)
    settle(mirror)
    assert mirror.owner == "s2-v1" and int(device.images[-1][0, 0]) == 30

    mirror.offer(b, picture(80, 60, 40), None)  # the sender changed resolution: reopen at the new size
    settle(mirror)
    assert device.closed and (camera.opened[-1].width, camera.opened[-1].height) == (80, 60)
    mirror.close()
    assert camera.opened[-1].closed


def test_a_busy_camera_skips_frames_instead_of_queueing(camera) -> None:
    metrics = ServiceMetrics()
    mirror = VirtualCameraMirror("/dev/video10", 30, metrics)
    camera.delay = 0.3
    owner = track("s1-v1")
    started = time.monotonic()
    for value in range(5):
        mirror.offer(owner, picture(32, 32, value), None)
    assert time.monotonic() - started < 0.2, "offer() must never wait for the camera"
    settle(mirror)
    assert len(camera.opened[0].images) == 1
    assert metrics.virtual_camera_skipped._value.get() == 4
    mirror.close()


async def test_missing_device_is_reported_and_webrtc_keeps_flowing() -> None:
    daemon = await start_daemon(virtual_camera=f"v4l2:{MISSING_DEVICE}")
    client = ClientPeer(PatternTrack())
    try:
        await client.connect(daemon.http, daemon.url)
        await client.wait_frames(10)

        async def camera_error() -> str | None:
            return (await daemon.get_json("/streams"))["virtual_camera"]["error"]

        deadline = time.monotonic() + 10
        while (error := await camera_error()) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        assert MISSING_DEVICE in error and "v4l2loopback" in error
        count = len(client.frames)
        await wait_for(lambda: len(client.frames) >= count + 10, 10, "frames after the camera failed")
    finally:
        await client.close()
        await stop_daemon(daemon)

