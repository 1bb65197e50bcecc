"""Encoding frames with libx264 for low latency and sending them as H.264 RTP over UDP.

The encoder is tuned for live use: ``tune=zerolatency`` (no lookahead, no frame
held back), no B-frames, a fixed maximum GOP, CRF or a bitrate with a small
VBV buffer. Parameter sets are repeated before every IDR so that a receiver can
join at any keyframe, and also kept for the SDP's sprop-parameter-sets.
RTP timestamps are the frames' pts at 90 kHz (plus a random offset, RFC 3550).

``send`` is synchronous and non-blocking (a plain UDP socket): call it from the
event loop for small frames, or from a worker thread, but from one thread at a time.
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

import av
import av.error
from av.video.frame import PictureType

from kfgan_daemon.errors import OutputError
from kfgan_daemon.media.bitstream import NalType, nal_type, split_annexb
from kfgan_daemon.media.colour import ColourSpace, convert_planes
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.rtp.decoder import RTP_VIDEO_TIME_BASE
from kfgan_daemon.media.rtp.h264 import DEFAULT_MTU, H264Packetizer
from kfgan_daemon.media.rtp.sdp import H264SessionDescription
from kfgan_daemon.media.source import ffmpeg_reason
from kfgan_daemon.media.x264 import H264Settings

log = logging.getLogger(__name__)

_SEND_BUFFER_BYTES = 4 << 20


@dataclass(slots=True)
class RtpSenderStats:
    frames_sent: int = 0
    keyframes_sent: int = 0
    packets_sent: int = 0
    bytes_sent: int = 0
    packets_dropped: int = 0  # the socket buffer was full or the network refused them


class RtpSender:
    """One H.264 RTP stream to ``host:port``; rate control as :class:`H264Settings` (``qp``, else ``bitrate``, else ``crf``)."""

    def __init__(
        self,
        host: str,
        port: int,
        width: int,
        height: int,
        frame_rate: Fraction | int | float,
        *,
        crf: int = 23,
        qp: int | None = None,
        bitrate: int | None = None,
        gop: int | None = None,
        preset: str = "veryfast",
        tune: str = "zerolatency",
        payload_type: int = 96,
        mtu: int = DEFAULT_MTU,
        ssrc: int | None = None,
        colour: ColourSpace | None = None,
        x264_options: Mapping[str, str] | None = None,
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise OutputError(f"rtp://{host}:{port}: H.264 output needs an even, positive size, not {width}x{height}")
        self.host = host
        self.port = port
        self.width = width
        self.height = height
        self.frame_rate = Fraction(frame_rate).limit_denominator(1001000)
        self.gop = gop if gop is not None else max(1, round(2 * self.frame_rate))
        # The SPS carries the colour description, so it is fixed when the encoder opens.
        self.colour = colour if colour is not None else ColourSpace.untagged(height)
        self.stats = RtpSenderStats()
        self._packetizer = H264Packetizer(payload_type=payload_type, ssrc=ssrc, mtu=mtu)
        self._timestamp_offset = secrets.randbits(32)
        self._last_pts: int | None = None
        self._force_keyframe = False
        self._encoder = self._open_encoder(crf, qp, bitrate, preset, tune, x264_options)
        self._parameter_sets = [unit for unit in split_annexb(bytes(self._encoder.extradata or b""))
                                if nal_type(unit) in (NalType.SPS, NalType.PPS)]
        self._socket = self._open_socket()

    def _open_encoder(
        self,
        crf: int,
        qp: int | None,
        bitrate: int | None,
        preset: str,
        tune: str,
        x264_options: Mapping[str, str] | None,
    ) -> av.CodecContext:
        settings = H264Settings(
            crf=crf, qp=qp, bitrate=bitrate, preset=preset, tune=tune, gop=self.gop, live=True, options=dict(x264_options or {})
        )
        encoder = av.CodecContext.create("libx264", "w")
        settings.configure(encoder, self.width, self.height, RTP_VIDEO_TIME_BASE, self.colour, self.frame_rate)
        try:
            encoder.open()
        except (av.error.FFmpegError, ValueError) as exc:
            raise OutputError(f"rtp://{self.host}:{self.port}: cannot open the H.264 encoder ({ffmpeg_reason(exc)})") from exc
        return encoder

    def _open_socket(self) -> socket.socket:
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else socket.AF_INET
        except ValueError:
            raise OutputError(f"rtp://{self.host}:{self.port}: the host must be an IP address") from None
        if not 0 < self.port < 65536:
            raise OutputError(f"rtp://{self.host}:{self.port}: port out of range")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER_BYTES)
        except OSError:
            log.debug("could not enlarge the RTP send buffer")
        return sock

    @property
    def ssrc(self) -> int:
        return self._packetizer.ssrc

    @property
    def parameter_sets(self) -> list[bytes]:
        return list(self._parameter_sets)

    def session_description(self) -> H264SessionDescription:
        sps = next((unit for unit in self._parameter_sets if nal_type(unit) == NalType.SPS), None)
        return H264SessionDescription(
            address=self.host,
            port=self.port,
            payload_type=self._packetizer.payload_type,
            packetization_mode=1,
            profile_level_id=sps[1:4].hex().upper() if sps is not None and len(sps) >= 4 else None,
            sprop_parameter_sets=self.parameter_sets,
            frame_rate=self.frame_rate,
        )

    def sdp(self) -> str:
        """The SDP a receiver (ffmpeg, GStreamer, VLC, :class:`RtpReceiver`) opens to play this stream."""
        return self.session_description().to_sdp()

    def request_keyframe(self) -> None:
        """Make the next frame an IDR (a receiver joined or lost packets)."""
        self._force_keyframe = True

    def send(self, frame: DecodedFrame) -> int:
        """Encode and send one frame's planes; returns the number of RTP packets sent."""
        if (frame.width, frame.height) != (self.width, self.height):
            raise OutputError(
                f"rtp://{self.host}:{self.port}: frame is {frame.width}x{frame.height}, "
                f"the stream was opened for {self.width}x{self.height}"
            )
        if frame.colour != self.colour:
            frame = frame.with_planes(*convert_planes(*frame.planes, frame.colour, self.colour), colour=self.colour)
        picture = frame.to_av()
        picture.pts = self._pts(frame)
        picture.time_base = RTP_VIDEO_TIME_BASE
        if self._force_keyframe:
            picture.pict_type = PictureType.I
            self._force_keyframe = False
        return self._encode(picture)

    def _pts(self, frame: DecodedFrame) -> int:
        if frame.pts is not None and frame.time_base is not None:
            pts = round(frame.pts * frame.time_base / RTP_VIDEO_TIME_BASE)
        else:
            pts = round(self.stats.frames_sent / self.frame_rate / RTP_VIDEO_TIME_BASE)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts = pts
        return pts

    def _encode(self, picture: av.VideoFrame | None) -> int:
        try:
            packets = self._encoder.encode(picture)
        except (av.error.FFmpegError, ValueError) as exc:
            raise OutputError(f"rtp://{self.host}:{self.port}: encoding failed ({ffmpeg_reason(exc)})") from exc
        sent = 0
        for packet in packets:
            nal_units = split_annexb(bytes(packet))
            timestamp = self._timestamp_offset + (packet.pts or 0)
            for rtp in self._packetizer.packetize(nal_units, timestamp):
                sent += self._transmit(rtp.serialize())
            self.stats.frames_sent += 1
            self.stats.keyframes_sent += packet.is_keyframe
        return sent

    def _transmit(self, datagram: bytes) -> int:
        try:
            self._socket.sendto(datagram, (self.host, self.port))
        except OSError as exc:  # buffer full (non-blocking), ICMP refusal, no route
            self.stats.packets_dropped += 1
            log.debug("RTP packet dropped: %s", exc)
            return 0
        self.stats.packets_sent += 1
        self.stats.bytes_sent += len(datagram)
        return 1

    def close(self) -> None:
        """Send what the encoder still holds and close the socket."""
        if self._socket.fileno() == -1:
            return
        try:
            self._encode(None)
        finally:
            self._socket.close()

    def __enter__(self) -> "RtpSender":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
