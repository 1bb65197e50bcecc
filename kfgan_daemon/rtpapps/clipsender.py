"""A clip played as a live H.264 RTP sender: the stand-in for a remote camera in the live bench and the tests.

The clip is encoded once up front (libx264, zero latency, no B-frames, a fixed
GOP) so that playing it costs the sending side almost nothing: what the bench
measures is the pipe, not the fake camera. :class:`RtpClipSender` plays on the
caller's event loop (tests drive it there, with loss and corruption);
:class:`RtpClipSenderProcess` plays the same sender from a process of its own
(this module run as ``python -m``), as the live bench does, so that a stalled
loop in the bench cannot delay the camera and hide its own stall.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from kfgan_daemon.errors import InputError, KfganError
from kfgan_daemon.ipc import encode_message, own_stdout, read_message, read_message_async, write_message
from kfgan_daemon.media import FileSource
from kfgan_daemon.media.bitstream import NalType, h264_access_unit_is_intra, nal_type, split_annexb
from kfgan_daemon.media.rtp.h264 import H264Packetizer
from kfgan_daemon.media.rtp.sdp import H264SessionDescription
from kfgan_daemon.media.x264 import H264Settings

RTP_CLOCK = 90000
# How long a camera process is given to end after being told to stop, before it is killed.
STOP_TIMEOUT = 5.0


class CameraProcessError(KfganError, RuntimeError):
    """A camera process ended without reporting what it sent (it crashed or was killed)."""


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

    ``scheduled_at`` is the camera's clock (``started_at + n / rate``): a camera
    that sends late would hide the delay from latency measured from ``sent_at``.
    All times are ``time.monotonic()``: CLOCK_MONOTONIC is system-wide on Linux,
    so a report from a camera process compares with the receiver's clock.
    """

    started_at: float  # time.monotonic(): the camera clock's origin, when picture 0 was due
    pid: int = field(default_factory=os.getpid)  # the process that sent
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
        start_at: float | None = None,
    ) -> PlayReport:
        """Send ``frames`` pictures (or ``seconds`` worth; default: the clip once) at real-time pace.

        ``start_frame`` starts inside the clip (e.g. between keyframes); ``packet_filter``
        can drop (return None) or alter any datagram, to simulate loss and corruption.
        ``start_at`` (``time.monotonic()``; default now) is when picture 0 is due.
        """
        assert self._transport is not None, "use 'async with RtpClipSender(...)'"
        rate = self.clip.frame_rate
        total = frames if frames is not None else (
            round(seconds * rate) if seconds is not None else len(self.clip.access_units) - start_frame
        )
        ticks = RTP_CLOCK / rate
        start = time.monotonic() if start_at is None else start_at
        report = PlayReport(started_at=start)
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


class RtpClipSenderProcess:
    """An :class:`RtpClipSender` playing from a process of its own (``python -m`` this module).

    ``async with`` starts the process and waits until it is up; :meth:`play`
    tells it when to start and returns its :class:`PlayReport`; leaving the block
    (normally, on an error or on cancellation) stops and reaps it. Nothing on the
    caller's event loop can delay the sending: only the report's arrival waits
    for the loop. The process stops by itself when its input closes, so it cannot
    outlive a caller that was killed.
    """

    def __init__(self, clip: EncodedClip, host: str, port: int, *, payload_type: int = 96, mtu: int = 1200) -> None:
        self._sender = RtpClipSender(clip, host, port, payload_type=payload_type, mtu=mtu)
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def session_description(self) -> H264SessionDescription:
        """The SDP a receiver of this camera opens (``to_sdp()`` gives the text)."""
        return self._sender.session_description()

    async def __aenter__(self) -> "RtpClipSenderProcess":
        # A subprocess rather than a multiprocessing spawn: spawn re-runs the caller's main
        # module in the child, which breaks any script without a __main__ guard.
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", _CAMERA_MODULE, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            await self._send(self._sender)
            await self._receive()  # its pid: it is up, with the clip
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            assert process.stdin is not None
            process.stdin.close()  # its input's end is its stop
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

    async def play(
        self,
        frames: int | None = None,
        *,
        seconds: float | None = None,
        start_at: float | None = None,
    ) -> PlayReport:
        """As :meth:`RtpClipSender.play`, from the camera process; ``start_at`` lets several cameras share one start."""
        await self._send({"frames": frames, "seconds": seconds, "start_at": start_at})
        return await self._receive()

    async def _send(self, message: object) -> None:
        assert self._process is not None and self._process.stdin is not None, "use 'async with RtpClipSenderProcess(...)'"
        self._process.stdin.write(encode_message(message))
        try:
            await self._process.stdin.drain()
        except ConnectionError as exc:
            raise CameraProcessError(f"the camera process ended early (exit code {await self._process.wait()})") from exc

    async def _receive(self) -> Any:
        assert self._process is not None and self._process.stdout is not None
        try:
            return await read_message_async(self._process.stdout)
        except EOFError as exc:
            raise CameraProcessError(
                f"the camera process ended without reporting (exit code {await self._process.wait()})"
            ) from exc


# The camera process's messages (kfgan_daemon.ipc). In: the sender, then the play's options;
# out: the pid, then the report.
_CAMERA_MODULE = "kfgan_daemon.rtpapps.clipsender"


def _camera_main() -> None:
    """The camera process: take the sender, report the pid, wait for the start, play once, report."""
    # Ctrl-C reaches the whole process group; the parent answers it by stopping this process,
    # and a second traceback from here would only hide the parent's.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    messages = own_stdout()
    stdin = sys.stdin.fileno()
    # Unbuffered: nothing may be read ahead of the messages, so that the play can watch the
    # descriptor itself for the parent closing it.
    requests = open(stdin, "rb", buffering=0, closefd=False)
    with messages:
        try:
            sender = read_message(requests)
            write_message(messages, os.getpid())
            options = read_message(requests)
        except EOFError:
            return
        report = asyncio.run(_play(sender, stdin, options))
        if report is not None:
            write_message(messages, report)


async def _play(sender: RtpClipSender, stdin: int, options: dict[str, Any]) -> PlayReport | None:
    """Play as asked; the parent closing our input (its stop, or its end) stops the play: None."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(stdin, stop.set)
    async with sender:
        report = await sender.play(stop=stop, **options)
    return None if stop.is_set() else report


if __name__ == "__main__":
    # Run as ``python -m``, this file is __main__, a second copy of the module: the pickled
    # sender names the real one, so the real one plays it.
    from kfgan_daemon.rtpapps.clipsender import _camera_main as camera_main

    camera_main()
