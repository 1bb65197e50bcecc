"""Decoding H.264 access units from the network into tagged frames.

Start-up: nothing is decoded until an intact intra access unit (an IDR, or a
picture made only of I slices) arrives and the sequence and picture parameter
sets are known (in-band, or from the SDP's sprop-parameter-sets, which are put
in front of an intra picture that lacks them).

Loss (an access unit that lost a packet, or one the decoder rejects), by
``loss_policy``:

- ``"conceal"`` (default): decode what arrived; FFmpeg conceals the missing
  macroblocks and the damage fades at the next intra picture. Video keeps
  flowing, as in ffmpeg or VLC.
- ``"wait_keyframe"``: drop the damaged access unit and everything after it
  until the next intact intra picture. No damaged picture is ever shown; the
  picture freezes until the sender's next keyframe.

``is_keyframe`` is true only for an intact intra picture (decoder picture type
I, nothing lost, not concealed), so a damaged picture never becomes a keyframe.
Each access unit is decoded as soon as it is complete: the decoder runs without
frame threading, so a stream without B-frames has no picture held back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, get_args

import av
import av.error

from kfgan_daemon.media.bitstream import NalType, join_annexb, nal_type
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import EXPORT_QUANTISERS, DecodedFrame, is_intra_picture
from kfgan_daemon.media.rtp.h264 import AccessUnit
from kfgan_daemon.media.source import ffmpeg_reason

log = logging.getLogger(__name__)

RTP_VIDEO_TIME_BASE = Fraction(1, 90000)
LossPolicy = Literal["conceal", "wait_keyframe"]
LOSS_POLICIES: tuple[str, ...] = get_args(LossPolicy)
# Access units whose pictures have not come out of the decoder yet (B-frame reordering).
_MAX_PENDING = 64


@dataclass(slots=True)
class DecoderStats:
    access_units: int = 0
    frames: int = 0
    keyframes: int = 0
    damaged_frames: int = 0
    decode_errors: int = 0
    dropped_waiting_keyframe: int = 0


class H264AccessUnitDecoder:
    def __init__(self, parameter_sets: list[bytes] | None = None, loss_policy: LossPolicy = "conceal") -> None:
        self.loss_policy = loss_policy
        self.stats = DecoderStats()
        self._sps: bytes | None = None
        self._pps: bytes | None = None
        self._remember_parameter_sets(parameter_sets or [])
        self._codec = self._new_codec()
        self.waiting_for_keyframe = True
        self.colour: ColourSpace | None = None  # of the last picture; give it to the encoder downstream
        self._damaged = False
        self._intact: dict[int, bool] = {}
        self._index = 0

    @staticmethod
    def _new_codec() -> av.CodecContext:
        codec = av.CodecContext.create("h264", "r")
        codec.thread_type = "SLICE"
        codec.options = dict(EXPORT_QUANTISERS)
        return codec

    def reset(self) -> None:
        """Forget the stream (a new sender): wait for an intra picture again."""
        self._codec = self._new_codec()
        self.waiting_for_keyframe = True
        self._damaged = False
        self._intact.clear()

    def decode(self, unit: AccessUnit, pts: int) -> list[DecodedFrame]:
        """Decode one access unit whose presentation time is ``pts`` (1/90000 s)."""
        self.stats.access_units += 1
        self._remember_parameter_sets(unit.nal_units)
        intra = unit.is_intra
        if self.waiting_for_keyframe:
            if not (intra and unit.complete and self._sps and self._pps):
                self.stats.dropped_waiting_keyframe += 1
                return []
            self.waiting_for_keyframe = False
            self._damaged = False
        if not unit.complete:
            if self.loss_policy == "wait_keyframe":
                self.waiting_for_keyframe = True
                self.stats.dropped_waiting_keyframe += 1
                return []
            self._damaged = True
        elif intra:
            self._damaged = False
        packet = av.Packet(self._bitstream(unit, intra))
        packet.pts = pts
        packet.time_base = RTP_VIDEO_TIME_BASE
        self._intact[pts] = not self._damaged
        try:
            pictures = self._codec.decode(packet)
        except (av.error.FFmpegError, ValueError) as exc:
            self.stats.decode_errors += 1
            log.debug("access unit at %d rejected by the decoder: %s", pts, ffmpeg_reason(exc))
            self._intact.pop(pts, None)
            self._damaged = True
            if self.loss_policy == "wait_keyframe":
                self.waiting_for_keyframe = True
            return []
        return [self._frame(picture) for picture in pictures]

    def _frame(self, picture: av.VideoFrame) -> DecodedFrame:
        intact = self._intact.pop(picture.pts, True) and not picture.is_corrupt
        while len(self._intact) > _MAX_PENDING:
            self._intact.pop(next(iter(self._intact)))
        picture.time_base = RTP_VIDEO_TIME_BASE
        self.colour = ColourSpace.of(picture)
        frame = DecodedFrame.from_av(
            picture, self._index, is_keyframe=intact and is_intra_picture(picture), colour=self.colour
        )
        self._index += 1
        self.stats.frames += 1
        self.stats.keyframes += frame.is_keyframe
        self.stats.damaged_frames += not intact
        return frame

    def _bitstream(self, unit: AccessUnit, intra: bool) -> bytes:
        units = unit.nal_units
        kinds = {nal_type(nal) for nal in units}
        if intra and not {NalType.SPS, NalType.PPS} <= kinds and self._sps and self._pps:
            units = [self._sps, self._pps, *units]
        return join_annexb(units)

    def _remember_parameter_sets(self, nal_units: list[bytes]) -> None:
        for nal in nal_units:
            if not nal:
                continue
            if nal_type(nal) == NalType.SPS:
                self._sps = nal
            elif nal_type(nal) == NalType.PPS:
                self._pps = nal
