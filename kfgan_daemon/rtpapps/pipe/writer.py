"""The pipe's output writer: opened at the first frame (the size is only known then), driven from one thread."""
from __future__ import annotations

import logging
import sys
from fractions import Fraction
from typing import BinaryIO

import cv2
import numpy as np

from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.rtp import RtpSender
from kfgan_daemon.media.rtp.decoder import RTP_VIDEO_TIME_BASE
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.media.y4m import Y4MWriter
from kfgan_daemon.rtpapps.pipe.target import OutputTarget

log = logging.getLogger(__name__)

DEFAULT_FRAME_RATE = Fraction(30)


# The RTP output's encoding unless the user says otherwise. ``superfast``, by measurement (s18 at
# 720p, CRF 23, zerolatency, one encoder thread, a shared 2-core machine at load 7): 9 ms per frame
# and 6.0 kB at 47.9 dB Y-PSNR, against 16 ms and 5.0 kB (47.6 dB) for ``veryfast`` and 3 ms and
# 10.3 kB (46.8 dB) for ``ultrafast``: ultrafast's 6 ms would cost 70% more bytes and a dB at the
# same CRF, veryfast's 7 ms more buy a sixth fewer bytes.
PIPE_ENCODE = EncodeOptions(crf=23, preset="superfast")


class LazyWriter:
    """Writes frames to an :class:`OutputTarget`, opening the RTP sender or y4m writer at the first frame.

    The output size is fixed by the first frame: an odd edge is cropped, a
    stream that changes resolution later is scaled back to it. A y4m output
    without a known frame rate holds its first frame until the second one
    tells the rate (y4m states it in the header). Not thread-safe: call from
    one thread.
    """

    def __init__(
        self,
        target: OutputTarget,
        encoder: EncodeOptions,
        frame_rate: Fraction | None,
        stdout: BinaryIO | None = None,
        *,
        ssrc: int | None = None,
        profile: str | None = None,
    ) -> None:
        self.target = target
        self.ssrc = ssrc
        self.profile = profile
        self.encoder = encoder
        self.frame_rate = frame_rate
        self.stdout = stdout
        self.size: tuple[int, int] | None = None
        self.sender: RtpSender | None = None
        self.writer: Y4MWriter | None = None
        self.resized = 0
        self._first: DecodedFrame | None = None
        self.closed = False

    def write(self, frame: DecodedFrame) -> None:
        if self.size is None:
            self.size = (frame.width - frame.width % 2, frame.height - frame.height % 2)
        frame = self._fit(frame)
        if self.target.kind == "rtp":
            if self.sender is None:
                self.sender = self._open_sender(frame.colour)
            self.sender.send(frame)
            return
        if self.writer is None:
            if self.frame_rate is None and self._first is None:
                self._first = frame
                return
            self.writer = self._open_writer(frame)
        self.writer.write(frame)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._first is not None and self.writer is None:
            self.writer = self._open_writer(None)
        if self.sender is not None:
            self.sender.close()
        if self.writer is not None:
            self.writer.stream.flush()

    def _fit(self, frame: DecodedFrame) -> DecodedFrame:
        assert self.size is not None
        width, height = self.size
        if (frame.width, frame.height) == (width, height):
            return frame
        if 0 <= frame.width - width <= 1 and 0 <= frame.height - height <= 1:
            # an odd edge: the chroma planes already cover the even size
            return frame.with_planes(
                np.ascontiguousarray(frame.y[:height, :width]),
                np.ascontiguousarray(frame.u[: height // 2, : width // 2]),
                np.ascontiguousarray(frame.v[: height // 2, : width // 2]),
            )
        if self.resized == 0:
            log.warning("input size changed to %dx%d; scaling to the output's %dx%d", frame.width, frame.height, width, height)
        self.resized += 1
        return frame.with_planes(
            cv2.resize(frame.y, (width, height), interpolation=cv2.INTER_AREA),
            cv2.resize(frame.u, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
            cv2.resize(frame.v, (width // 2, height // 2), interpolation=cv2.INTER_AREA),
        )

    def _open_sender(self, colour: ColourSpace) -> RtpSender:
        """The sender, tagged with the stream's colour space: its planes then go out unconverted."""
        assert self.size is not None and self.target.host is not None and self.target.port is not None
        width, height = self.size
        return RtpSender(
            self.target.host,
            self.target.port,
            width,
            height,
            self.frame_rate or DEFAULT_FRAME_RATE,
            colour=colour,
            ssrc=self.ssrc,
            x264_options={"profile": self.profile} if self.profile else None,
            **self.encoder.sink_options(PIPE_ENCODE.crf),
        )

    def request_keyframe(self) -> None:
        """Make the next RTP frame an IDR (a receiver asked for one); any thread."""
        if self.sender is not None:
            self.sender.request_keyframe()

    def _open_writer(self, second: DecodedFrame | None) -> Y4MWriter:
        assert self.size is not None
        rate = self.frame_rate or rate_between(self._first, second) or DEFAULT_FRAME_RATE
        writer = Y4MWriter(self.stdout or sys.stdout.buffer, *self.size, rate)
        first, self._first = self._first, None
        if first is not None:
            writer.write(first)
        return writer


def rate_between(first: DecodedFrame | None, second: DecodedFrame | None) -> Fraction | None:
    """The frame rate two consecutive frames' timestamps imply, or None."""
    if first is None or second is None or first.pts is None or second.pts is None or second.pts <= first.pts:
        return None
    seconds = Fraction(second.pts - first.pts) * (second.time_base or RTP_VIDEO_TIME_BASE)
    return (1 / seconds).limit_denominator(1001)
