"""A clip played as a live H.264 RTP sender: the stand-in for a remote camera in the live bench and the tests.

The clip is encoded once up front (libx264, zero latency, no B-frames, a fixed
GOP) so that playing it costs the sending side almost nothing: what the bench
measures is the pipe, not the fake camera.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av

from kfgan_daemon.errors import InputError
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.bitstream import NalType, h264_access_unit_is_intra, nal_type, split_annexb
from kfgan_daemon.media.rtp.h264 import H264Packetizer
from kfgan_daemon.media.rtp.sdp import H264SessionDescription
from kfgan_daemon.media.x264 import H264Settings

RTP_CLOCK = 90000


@dataclass(slots=True)
class EncodedClip:
    """A clip as H.264 access units (NAL units without start codes), one per picture."""

    access_units: list[list[bytes]]
    width: int
    height: int
    frame_rate: Fraction

    @property
    def keyframes(self) -> list[bool]:
        return [h264_access_unit_is_intra(unit) for unit in self.access_units]

    @property
    def parameter_sets(self) -> list[bytes]:
        for unit in self.access_units:
            sets = [nal for nal in unit if nal_type(nal) in (NalType.SPS, NalType.PPS)]
            if sets:
                return sets
        return []


def encode_clip(
    clip: Path,
    *,
    max_frames: int | None = None,
    size: tuple[int, int] | None = None,
    frame_rate: Fraction | int | None = None,
    crf: int = 30,
    gop: int = 30,
    preset: str = "veryfast",
) -> EncodedClip:
    """Encode ``clip`` (resized to ``size`` = (width, height) if given) for real-time RTP sending."""
    with FileSource(clip) as source:
        rate = Fraction(frame_rate) if frame_rate is not None else Fraction(source.frame_rate)
        width, height = size or (source.width, source.height)
        width, height = width - width % 2, height - height % 2
        codec = av.CodecContext.create("libx264", "w")
        settings = H264Settings(
            crf=crf,
            preset=preset,
            tune="zerolatency",
            gop=gop,
            options={"bf": "0", "keyint_min": str(gop), "sc_threshold": "0"},
        )
        units: list[list[bytes]] = []
        for n, frame in enumerate(source):
            if max_frames is not None and n >= max_frames:
                break
            picture = frame.to_av()
            if (frame.width, frame.height) != (width, height):
                picture = picture.reformat(width=width, height=height, format="yuv420p")
            if n == 0:
                settings.configure(codec, width, height, 1 / rate, frame.colour, rate)
            picture.pts = n
            units += [split_annexb(bytes(packet)) for packet in codec.encode(picture)]
        units += [split_annexb(bytes(packet)) for packet in codec.encode(None)]
    if not units:
        raise InputError(f"{clip}: no video frames to send")
    return EncodedClip(units, width, height, rate)


@dataclass(slots=True)
class PlayReport:
    """What a play sent: per picture, the RTP timestamp, when it was due and when its last packet left.

    ``scheduled_at`` is the camera's clock (start + n / rate): a stalled event
    loop sends late, and latency measured from ``sent_at`` would hide the stall.
    """

    timestamps: list[int] = field(default_factory=list)
    scheduled_at: list[float] = field(default_factory=list)  # time.monotonic()
    sent_at: list[float] = field(default_factory=list)  # time.monotonic()
    keyframes: list[bool] = field(default_factory=list)
    packets: int = 0
    dropped_packets: int = 0

    @property
    def frames(self) -> int:
        return len(self.timestamps)


# Called for every packet: (picture number, packet number within it, datagram) -> datagram to send or None.
PacketFilter = Callable[[int, int, bytes], bytes | None]


class RtpClipSender:
    """Plays an :class:`EncodedClip` to ``host:port`` at its frame rate, looping it as long as asked."""

    def __init__(self, clip: EncodedClip, host: str, port: int, *, payload_type: int = 96, mtu: int = 1200) -> None:
        self.clip = clip
        self.host = host
        self.port = port
        self.packetizer = H264Packetizer(payload_type=payload_type, mtu=mtu)
        self._transport: asyncio.DatagramTransport | None = None

    def session_description(self) -> H264SessionDescription:
        """The SDP a receiver of this sender opens (``to_sdp()`` gives the text)."""
        return H264SessionDescription(
            address=self.host,
            port=self.port,
            payload_type=self.packetizer.payload_type,
            sprop_parameter_sets=self.clip.parameter_sets,
            frame_rate=self.clip.frame_rate,
            session_name="kfgan-daemon live bench",
        )

    async def __aenter__(self) -> "RtpClipSender":
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(self.host, self.port)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def send_raw(self, datagram: bytes) -> None:
        """Send any datagram (garbage, truncated packets) to the receiver."""
        assert self._transport is not None, "use 'async with RtpClipSender(...)'"
        self._transport.sendto(datagram)

    async def play(
        self,
        frames: int | None = None,
        *,
        seconds: float | None = None,
        start_frame: int = 0,
        first_timestamp: int = 0,
        packet_filter: PacketFilter | None = None,
        stop: asyncio.Event | None = None,
    ) -> PlayReport:
        """Send ``frames`` pictures (or ``seconds`` worth; default: the clip once) at real-time pace.

        ``start_frame`` starts inside the clip (e.g. between keyframes); ``packet_filter``
        can drop (return None) or alter any datagram, to simulate loss and corruption.
        """
        assert self._transport is not None, "use 'async with RtpClipSender(...)'"
        rate = self.clip.frame_rate
        total = frames if frames is not None else (
            round(seconds * rate) if seconds is not None else len(self.clip.access_units) - start_frame
        )
        ticks = RTP_CLOCK / rate
        report = PlayReport()
        start = time.monotonic()
        for n in range(total):
            if stop is not None and stop.is_set():
                break
            due = start + float(n / rate)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            unit = self.clip.access_units[(start_frame + n) % len(self.clip.access_units)]
            timestamp = (first_timestamp + round(n * ticks)) & 0xFFFFFFFF
            for number, packet in enumerate(self.packetizer.packetize(unit, timestamp)):
                datagram = packet.serialize()
                if packet_filter is not None:
                    datagram = packet_filter(n, number, datagram)
                if datagram is None:
                    report.dropped_packets += 1
                    continue
                self._transport.sendto(datagram)
                report.packets += 1
            report.timestamps.append(timestamp)
            report.scheduled_at.append(due)
            report.sent_at.append(time.monotonic())
            report.keyframes.append(h264_access_unit_is_intra(unit))
        return report
