"""YUV4MPEG2 output to a byte stream, for ``pipe --output - | ffmpeg -i -``.

The header says ``C420jpeg``: 4:2:0 planar, which is what FFmpeg's yuv4mpeg
demuxer assumes when there is no C tag at all and what its own muxer writes for
yuv420p, so every FFmpeg-based reader takes it without options. Pixels are
limited range (``XCOLORRANGE=LIMITED``), converted with the BT.601 matrix
unless told otherwise.
"""
from __future__ import annotations

from fractions import Fraction
from typing import BinaryIO

import numpy as np

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.conversion import check_colorspace, yuv420_frame
from kfgan_daemon.media.frame import DecodedFrame


class Y4MWriter:
    """Writes frames as YUV4MPEG2 (4:2:0) to a binary stream such as ``sys.stdout.buffer``."""

    def __init__(
        self,
        stream: BinaryIO,
        width: int,
        height: int,
        frame_rate: Fraction | int | float,
        *,
        colorspace: str | None = None,
    ) -> None:
        check_colorspace(colorspace)
        if width <= 0 or height <= 0:
            raise OutputError(f"y4m: invalid frame size {width}x{height}")
        self.stream = stream
        self.width = width
        self.height = height
        self.frame_rate = Fraction(frame_rate).limit_denominator(1001000)
        self.colorspace = colorspace
        self.frames_written = 0
        self._header_written = False

    def header(self) -> bytes:
        rate = self.frame_rate
        return (
            f"YUV4MPEG2 W{self.width} H{self.height} F{rate.numerator}:{rate.denominator} "
            "Ip A1:1 C420jpeg XYSCSS=420JPEG XCOLORRANGE=LIMITED\n"
        ).encode("ascii")

    def write(self, frame: DecodedFrame) -> None:
        height, width = frame.image.shape[:2]
        if (width, height) != (self.width, self.height):
            raise OutputError(f"y4m: frame is {width}x{height}, the stream was opened for {self.width}x{self.height}")
        picture = yuv420_frame(frame.image, self.colorspace)
        chunks = [] if self._header_written else [self.header()]
        chunks.append(b"FRAME\n")
        for plane in picture.planes:
            rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
            chunks.append(rows[:, : plane.width].tobytes())
        try:
            self.stream.write(b"".join(chunks))
            self.stream.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise OutputError("y4m: the reading end of the pipe was closed") from exc
        except OSError as exc:
            raise OutputError(f"y4m: writing failed ({exc})") from exc
        self._header_written = True
        self.frames_written += 1
