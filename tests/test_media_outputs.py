"""Y4M to a byte stream and the virtual camera sink."""
from __future__ import annotations

import io
import sys
import types
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media import DecodedFrame, VirtualCameraSink, Y4MWriter
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.vcam import CAMERA_COLOUR


def frame(index: int, width: int = 64, height: int = 48, colour: ColourSpace = ColourSpace("bt601")) -> DecodedFrame:
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([(x * 4 + index) % 256, (y * 5) % 256, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return DecodedFrame.from_rgb(image, colour, pts=index, time_base=Fraction(1, 30), is_keyframe=index == 0, index=index)


def test_y4m_is_read_back_by_ffmpeg() -> None:
    buffer = io.BytesIO()
    writer = Y4MWriter(buffer, 64, 48, Fraction(30000, 1001))
    originals = [frame(i) for i in range(5)]
    for item in originals:
        writer.write(item)
    data = buffer.getvalue()
    header = data.split(b"\n", 1)[0]
    assert data.startswith(b"YUV4MPEG2 W64 H48 F30000:1001 ") and b" C420jpeg" in header
    assert b"XCOLORRANGE=LIMITED" in header
    assert data.count(b"FRAME\n") == 5
    with av.open(io.BytesIO(data), format="yuv4mpegpipe") as container:
        stream = container.streams.video[0]
        assert stream.average_rate == Fraction(30000, 1001)
        decoded = [DecodedFrame.from_av(f) for f in container.decode(stream)]
    assert len(decoded) == 5
    # The planes go out as they are: what FFmpeg reads back is bit-identical.
    assert all(got.same_pixels(want) for got, want in zip(decoded, originals))


def test_y4m_keeps_full_range_and_converts_a_stray_frame_exactly() -> None:
    buffer = io.BytesIO()
    writer = Y4MWriter(buffer, 64, 48, 25)
    full = ColourSpace("bt709", full_range=True)
    writer.write(frame(0, colour=full))
    writer.write(frame(1, colour=ColourSpace("bt601")))
    assert b"XCOLORRANGE=FULL" in buffer.getvalue().split(b"\n", 1)[0]
    with av.open(io.BytesIO(buffer.getvalue()), format="yuv4mpegpipe") as container:
        first, second = (DecodedFrame.from_av(f, colour=full) for f in container.decode(video=0))
    assert first.same_pixels(frame(0, colour=full))
    # The BT.601 frame was re-expressed in the stream's space: same RGB to within rounding.
    difference = second.rgb().astype(int) - frame(1).rgb()
    assert np.abs(difference).max() <= 2 and abs(difference.mean()) < 0.05


def test_y4m_odd_size_and_size_mismatch() -> None:
    buffer = io.BytesIO()
    writer = Y4MWriter(buffer, 63, 47, 25)
    writer.write(frame(0, 63, 47))
    with av.open(io.BytesIO(buffer.getvalue()), format="yuv4mpegpipe") as container:
        (picture,) = list(container.decode(video=0))
    assert (picture.width, picture.height) == (63, 47)
    assert DecodedFrame.from_av(picture).same_pixels(frame(0, 63, 47))
    with pytest.raises(OutputError, match="64x48"):
        writer.write(frame(1))


def test_y4m_closed_pipe_is_an_output_error() -> None:
    class ClosedPipe(io.RawIOBase):
        def write(self, data: bytes) -> int:
            raise BrokenPipeError

    with pytest.raises(OutputError, match="pipe was closed"):
        Y4MWriter(ClosedPipe(), 64, 48, 25).write(frame(0))


def test_vcam_missing_device_names_the_module() -> None:
    with pytest.raises(OutputError, match=r"/dev/video97 does not exist.*modprobe v4l2loopback"):
        VirtualCameraSink("/dev/video97", 64, 48, 30)


def test_vcam_without_pyvirtualcam(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    with pytest.raises(OutputError, match=r"pip install 'kfgan-daemon\[vcam\]'"):
        VirtualCameraSink("/dev/video0", 64, 48, 30)


def test_vcam_device_that_is_not_a_loopback(tmp_path: Path) -> None:
    not_a_camera = tmp_path / "video5"
    not_a_camera.write_bytes(b"")
    with pytest.raises(OutputError, match="cannot open as a v4l2loopback camera"):
        VirtualCameraSink(not_a_camera, 64, 48, 30)


def test_vcam_sends_i420_planes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sent: list[np.ndarray] = []

    class FakeCamera:
        def __init__(self, width, height, fps, *, fmt, device, backend):
            assert (width, height, backend, fmt) == (64, 48, "v4l2loopback", "I420")
            self.closed = False

        def send(self, image: np.ndarray) -> None:
            sent.append(image)

        def close(self) -> None:
            self.closed = True

    fake = types.SimpleNamespace(Camera=FakeCamera, PixelFormat=types.SimpleNamespace(I420="I420"))
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake)
    device = tmp_path / "video7"
    device.write_bytes(b"")
    with VirtualCameraSink(device, 64, 48, 30) as sink:
        sink.write(frame(0))
        hd = frame(1, colour=ColourSpace("bt709"))
        sink.write(hd)
        with pytest.raises(OutputError, match="opened for 64x48"):
            sink.write(frame(1, 32, 32))
        with pytest.raises(OutputError, match="even"):
            VirtualCameraSink(device, 63, 48, 30)
    assert len(sent) == 2 and all(image.shape == (64 * 48 * 3 // 2,) for image in sent)
    # BT.601 limited planes go out untouched; others are converted to it.
    assert np.array_equal(sent[0], np.concatenate([p.ravel() for p in frame(0).planes]))
    assert CAMERA_COLOUR == ColourSpace("bt601")
    assert not np.array_equal(sent[1], np.concatenate([p.ravel() for p in hd.planes]))
