"""`pipe` through RTP trouble, on real UDP sockets on loopback.

A clip is played into the pipe as H.264 RTP; halfway through, the sender
misbehaves once: one stray packet far ahead in sequence, a sequence number that
jumps back (RFC 3550 A.1 probation follows it after two packets), or a
timestamp that jumps back (a sender restarted with the same SSRC). The pipe's
RTP output is read off a plain socket: every picture must come out but the
ones the trouble corrupts (at most 2 frame intervals' worth), and the output
timestamps must stay paced at the frame rate.
"""
from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from clips import write_synthetic_clip
from kfgan_daemon.media.rtp import RtpPacket
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.rtpapps.clipsender import EncodedClip, PlayReport, RtpClipSender, encode_clip
from kfgan_daemon.rtpapps.pipe import PipeHooks, PipeSummary, run_pipe

pytestmark = pytest.mark.timeout(120)

FPS = 25
TICKS = 90000 // FPS
HALF = 25  # frames before and after the trouble


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> EncodedClip:
    path = write_synthetic_clip(tmp_path_factory.mktemp("recovery") / "clip.mp4", frames=2 * HALF, width=320,
                                height=240, fps=FPS, gop=10)
    return encode_clip(path, gop=10, crf=28)


class _Collector(asyncio.DatagramProtocol):
    """The pipe's RTP output, packet by packet."""

    def __init__(self) -> None:
        self.packets: list[RtpPacket] = []
        self.picture_times: list[float] = []  # time.monotonic() of each picture's last packet

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        packet = RtpPacket.parse(data)
        self.packets.append(packet)
        if packet.marker:
            self.picture_times.append(time.monotonic())

    def frame_timestamps(self) -> list[int]:
        """One RTP timestamp per output picture (its last packet carries the marker), in arrival order."""
        return [packet.timestamp for packet in self.packets if packet.marker]


Trouble = Callable[[RtpClipSender, PlayReport], dict]


async def play_through_pipe(clip: EncodedClip, tmp_path: Path, trouble: Trouble) -> tuple[list[int], PipeSummary]:
    sender = RtpClipSender(clip, "127.0.0.1", free_udp_port())
    input_sdp = tmp_path / "in.sdp"
    input_sdp.write_text(sender.session_description().to_sdp())
    loop = asyncio.get_running_loop()
    transport, collector = await loop.create_datagram_endpoint(_Collector, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    torch.manual_seed(0)
    stop, ready = asyncio.Event(), asyncio.Event()
    pipe = asyncio.create_task(run_pipe(
        input_sdp, f"rtp://127.0.0.1:{port}", CropGenerator(LiteGenerator(channels=8, blocks=1)),
        stop=stop, hooks=PipeHooks(on_ready=lambda receiver: ready.set()), handle_signals=False,
    ))
    try:
        await asyncio.wait_for(ready.wait(), 20)
        async with sender:
            # Until pictures come out: the stream's first second (models loading) is not what is measured.
            warm = await sender.play(HALF)
            for _ in range(10):
                if len(collector.picture_times) >= 5:
                    break
                warm = await sender.play(HALF, first_timestamp=warm.timestamps[-1] + TICKS)
            collector.packets.clear()
            collector.picture_times.clear()
            first = await sender.play(HALF, first_timestamp=warm.timestamps[-1] + TICKS)
            await sender.play(HALF, start_frame=HALF, **trouble(sender, first))
        await asyncio.sleep(0.5)  # the last frames through the pipe
    finally:
        stop.set()
        summary = await asyncio.wait_for(pipe, 20)
        transport.close()
    times = collector.picture_times
    gap = max((later - earlier for earlier, later in zip(times, times[1:])), default=0.0)
    print(f"\nlongest wait between output pictures: {1000 * gap:.0f} ms (frame interval {1000 / FPS:.0f} ms)")
    return collector.frame_timestamps(), summary


def assert_paced(timestamps: list[int]) -> None:
    steps = [(later - earlier) & 0xFFFFFFFF for earlier, later in zip(timestamps, timestamps[1:])]
    # Every step one frame interval; a lost picture may make one step two or three.
    assert all(step % TICKS == 0 and 0 < step <= 3 * TICKS for step in steps), steps
    assert sum(step != TICKS for step in steps) <= 2, steps


async def test_a_stray_packet_far_ahead_costs_no_picture(clip: EncodedClip, tmp_path: Path) -> None:
    def stray(sender: RtpClipSender, first: PlayReport) -> dict:
        def packet_filter(picture: int, number: int, datagram: bytes) -> bytes:
            if picture == 2 and number == 0:
                packet = RtpPacket.parse(datagram)
                packet.sequence_number = (packet.sequence_number + 1000) & 0xFFFF
                sender.send_raw(packet.serialize())
            return datagram

        return {"first_timestamp": first.timestamps[-1] + TICKS, "packet_filter": packet_filter}

    timestamps, summary = await play_through_pipe(clip, tmp_path, stray)
    print("\n" + summary.describe())
    # The old buffer jumped to the stray and dropped everything behind it for ~20 s.
    assert len(timestamps) >= 2 * HALF - 2, f"{len(timestamps)} of {2 * HALF} pictures came out"
    assert summary.receiver.packets_lost == 0
    assert_paced(timestamps)


async def test_a_backward_sequence_jump_is_followed_within_two_frames(clip: EncodedClip, tmp_path: Path) -> None:
    def jump_back(sender: RtpClipSender, first: PlayReport) -> dict:
        sender.packetizer.sequence_number = (sender.packetizer.sequence_number - 500) & 0xFFFF
        return {"first_timestamp": first.timestamps[-1] + TICKS}

    timestamps, summary = await play_through_pipe(clip, tmp_path, jump_back)
    print("\n" + summary.describe())
    # The old buffer took every packet after the jump for late, for 500 packets (~10 s).
    assert len(timestamps) >= 2 * HALF - 2, f"{len(timestamps)} of {2 * HALF} pictures came out"
    assert summary.receiver.sequence_jumps == 1
    assert_paced(timestamps)


async def test_a_backward_timestamp_jump_keeps_output_paced(clip: EncodedClip, tmp_path: Path) -> None:
    def restart_clock(sender: RtpClipSender, first: PlayReport) -> dict:
        return {"first_timestamp": (first.timestamps[-1] - 10 * 90000) & 0xFFFFFFFF}  # 10 s back

    timestamps, summary = await play_through_pipe(clip, tmp_path, restart_clock)
    print("\n" + summary.describe())
    assert len(timestamps) >= 2 * HALF - 2
    assert summary.receiver.timestamp_jumps == 1
    # Clamping instead of re-basing made every later step a single tick.
    assert_paced(timestamps)
