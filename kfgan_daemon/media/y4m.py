"""YUV4MPEG2 output to a byte stream, for ``pipe --output - | ffmpeg -i -``.

The header says ``C420jpeg``: 4:2:0 planar, which is what FFmpeg's yuv4mpeg
demuxer assumes when there is no C tag at all and what its own muxer writes for
yuv420p, so every FFmpeg-based reader takes it without options. The planes
are written as they were decoded, and the range is tagged (``XCOLORRANGE``);
YUV4MPEG2 has no tag for the matrix, so a reader assumes its own default
(FFmpeg: BT.601 for SD, BT.709 for HD, the same convention as untagged input).
"""
from __future__ import annotations

from fractions import Fraction
from typing import BinaryIO

import numpy as np

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.colour import ColourSpace, convert_planes
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
        colour: ColourSpace | None = None,
    ) -> None:
        if width <= 0 or height <= 0:
            raise OutputError(f"y4m: invalid frame size {width}x{height}")
        self.stream = stream
        self.width = width
        self.height = height
        self.frame_rate = Fraction(frame_rate).limit_denominator(1001000)
        self.colour = colour  # the first frame's when None
        self.frames_written = 0
        self._header_written = False

    def header(self) -> bytes:
        rate = self.frame_rate
        colour = self.colour or ColourSpace.untagged(self.height)
        return (
            f"YUV4MPEG2 W{self.width} H{self.height} F{rate.numerator}:{rate.denominator} "
            f"Ip A1:1 C420jpeg XYSCSS=420JPEG {colour.y4m_tags}\n"
        ).encode("ascii")

    def write(self, frame: DecodedFrame) -> None:
        """Write one frame's planes as they are (converted only if its colour space differs from the stream's)."""
        if (frame.width, frame.height) != (self.width, self.height):
            raise OutputError(
                f"y4m: frame is {frame.width}x{frame.height}, the stream was opened for {self.width}x{self.height}"
            )
        if self.colour is None:
            self.colour = frame.colour
        planes = frame.planes
        if frame.colour != self.colour:
            planes = convert_planes(*planes, frame.colour, self.colour)
        chunks = [] if self._header_written else [self.header()]
        chunks.append(b"FRAME\n")
        chunks.extend(np.ascontiguousarray(plane).tobytes() for plane in planes)
        try:
            self.stream.write(b"".join(chunks))
            self.stream.flush()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise OutputError("y4m: the reading end of the pipe was closed") from exc
        except OSError as exc:
            raise OutputError(f"y4m: writing failed ({exc})") from exc
        self._header_written = True
        self.frames_written += 1
