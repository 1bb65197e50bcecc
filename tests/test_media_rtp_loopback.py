"""RtpSender -> UDP loopback -> RtpReceiver: real sockets, real encoder and decoder."""
from __future__ import annotations

import asyncio
import socket
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from kfgan_daemon.errors import InputError, SdpError
from kfgan_daemon.media import DecodedFrame, FileSink, FileSource
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.bitstream import split_annexb
from kfgan_daemon.media.rtp import (
    H264Packetizer,
    H264SessionDescription,
    ReceiverState,
    ReceiverStatus,
    RtpPacket,
    RtpReceiver,
    RtpSender,
    parse_sdp,
)

WIDTH, HEIGHT, FPS = 160, 120, 25
TICKS = 90000 // FPS


def picture(index: int) -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    image = np.stack([(x + 3 * index) % 256, (2 * y + index) % 256, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    top = (4 * index) % (HEIGHT - 30)
    image[top : top + 30, 40:80] = (20, 220, 240)
    return image


def frame(index: int, colour: ColourSpace = ColourSpace("bt601")) -> DecodedFrame:
    return DecodedFrame.from_rgb(
        picture(index), colour, pts=index, time_base=Fraction(1, FPS), is_keyframe=False, index=index
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rtp") / "clip.mp4"
    with FileSink(path, WIDTH, HEIGHT, FPS, Fraction(1, FPS), crf=20, preset="ultrafast") as sink:
        for i in range(60):
            sink.write(frame(i))
    return path


def local_description(port: int = 0) -> H264SessionDescription:
    return H264SessionDescription(address="127.0.0.1", port=port, frame_rate=Fraction(FPS))


def collecting(receiver: RtpReceiver, count: int, timeout: float = 5.0) -> asyncio.Task:
    """Consume frames concurrently, as a real consumer does (the receiver drops what nobody takes)."""
    return asyncio.create_task(collect(receiver, count, timeout))


async def collect(receiver: RtpReceiver, count: int, timeout: float = 5.0) -> list[DecodedFrame]:
    frames: list[DecodedFrame] = []

    async def take() -> None:
        async for item in receiver:
            frames.append(item)
            if len(frames) >= count:
                return

    try:
        await asyncio.wait_for(take(), timeout)
    except asyncio.TimeoutError:
        pass
    return frames


async def send_all(sender: RtpSender, frames, interval: float = 0.005) -> list[bool]:
    """Send frames at a pace; returns, per frame, whether the encoder made it a keyframe."""
    keyframes = []
    for item in frames:
        before = sender.stats.keyframes_sent
        sender.send(item)
        keyframes.append(sender.stats.keyframes_sent > before)
        await asyncio.sleep(interval)
    return keyframes


async def test_clip_over_rtp_arrives_decoded_and_tagged(clip: Path) -> None:
    async with RtpReceiver(local_description()) as receiver:
        host, port = receiver.local_address
        with FileSource(clip) as source:
            originals = list(source)
        consumer = collecting(receiver, len(originals))
        with RtpSender(host, port, WIDTH, HEIGHT, FPS, gop=12, crf=20) as sender:
            sent_keyframes = await send_all(sender, originals)
            received = await consumer
        stats = receiver.stats
    assert len(received) >= 0.95 * len(originals)
    assert stats.packets_lost == 0 and stats.packets_malformed == 0 and stats.decode_errors == 0
    by_index = {f.pts // TICKS: f for f in received}
    assert sorted(by_index) == list(range(len(received)))
    assert [i for i, f in sorted(by_index.items()) if f.is_keyframe] == [
        i for i, key in enumerate(sent_keyframes) if key and i in by_index
    ]
    assert sent_keyframes[0] and sum(sent_keyframes) >= 5, sent_keyframes  # GOP 12 over 60 frames
    for index, got in by_index.items():
        assert got.y.shape == (HEIGHT, WIDTH) and got.colour == originals[index].colour
        assert np.abs(got.y.astype(int) - originals[index].y).mean() < 4


async def test_colour_tags_travel_in_the_parameter_sets() -> None:
    space = ColourSpace("bt709", full_range=True)
    async with RtpReceiver(local_description()) as receiver:
        consumer = collecting(receiver, 5)
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=10, colour=space) as sender:
            originals = [frame(i, space) for i in range(6)]
            await send_all(sender, originals)
            received = await consumer
        assert receiver.colour == space
    assert received and all(got.colour == space for got in received)
    # The planes were encoded as they are: no conversion bias on the luma.
    assert abs(np.mean([got.y.astype(int) - originals[got.pts // TICKS].y for got in received])) < 0.5


async def test_requested_keyframe_is_sent_and_tagged() -> None:
    async with RtpReceiver(local_description()) as receiver:
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=250) as sender:
            await send_all(sender, [frame(i) for i in range(5)])
            sender.request_keyframe()
            await send_all(sender, [frame(i) for i in range(5, 8)])
        received = await collect(receiver, 8)
    assert [f.pts // TICKS for f in received if f.is_keyframe] == [0, 5]


async def test_bad_datagrams_are_counted_and_the_stream_survives() -> None:
    async with RtpReceiver(local_description()) as receiver:
        address = receiver.local_address
        noise = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        consumer = collecting(receiver, 20)
        with noise, RtpSender(*address, WIDTH, HEIGHT, FPS, gop=10) as sender:
            for i in range(20):
                sender.send(frame(i))
                if i % 4 == 1:
                    noise.sendto(b"\x80\x60\x00", address)  # truncated RTP header
                    noise.sendto(b"not rtp at all, just text", address)  # version 1
                    noise.sendto(RtpPacket(96, 1, 1, sender.ssrc, payload=b"\x7c").serialize(), address)  # short FU-A
                    noise.sendto(b"\x80\xc8\x00\x06" + bytes(24), address)  # an RTCP sender report
                    noise.sendto(RtpPacket(111, 5, 5, 77, payload=b"\x41\x00").serialize(), address)  # other PT
                await asyncio.sleep(0.005)
            received = await consumer
        stats = receiver.stats
    assert len(received) >= 19
    assert stats.packets_malformed >= 10  # 5 x (truncated header, bad version)
    assert stats.packets_ignored >= 10  # 5 x (RTCP, other payload type)
    assert receiver.state == ReceiverState.CLOSED


def h264_access_units(count: int) -> list[list[bytes]]:
    """NAL units per picture from a plain PyAV libx264 encoder (independent of RtpSender)."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, FPS), FPS
    encoder.options = {"tune": "zerolatency", "preset": "ultrafast", "bf": "0"}
    units = []
    for i in range(count):
        picture_ = DecodedFrame.from_rgb(picture(i), ColourSpace("bt601")).to_av()
        picture_.pts = i
        units += [split_annexb(bytes(packet)) for packet in encoder.encode(picture_)]
    return units


async def test_reordered_packets_are_put_back_in_order() -> None:
    packetizer = H264Packetizer(ssrc=42)
    packets = []
    for i, nal_units in enumerate(h264_access_units(6)):
        packets += packetizer.packetize(nal_units, i * TICKS)
    packets[1], packets[2] = packets[2], packets[1]
    packets[-2], packets[-1] = packets[-1], packets[-2]
    async with RtpReceiver(local_description()) as receiver:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for packet in packets:
                sock.sendto(packet.serialize(), receiver.local_address)
        received = await collect(receiver, 6)
        stats = receiver.stats
    assert [f.pts // TICKS for f in received] == list(range(6))
    assert stats.packets_lost == 0 and stats.frames_damaged == 0


async def test_silence_is_reported_and_the_stream_recovers() -> None:
    events: list[ReceiverStatus] = []
    async with RtpReceiver(local_description(), silence_timeout=0.3, on_status=events.append) as receiver:
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=10) as sender:
            await send_all(sender, [frame(i) for i in range(5)])
            first = await collect(receiver, 5)
            await asyncio.sleep(0.6)
            assert receiver.state == ReceiverState.SILENT
            await send_all(sender, [frame(i) for i in range(5, 10)])
            second = await collect(receiver, 5)
        assert receiver.state == ReceiverState.RECEIVING
        assert receiver.stats.silences == 1
    states = [event.state for event in events]
    assert states == [
        ReceiverState.STARTING, ReceiverState.RECEIVING, ReceiverState.SILENT, ReceiverState.RECEIVING, ReceiverState.CLOSED,
    ]
    assert [f.pts // TICKS for f in first + second] == list(range(10))


async def test_restarted_sender_is_adopted_after_silence() -> None:
    async with RtpReceiver(local_description(), silence_timeout=0.3) as receiver:
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=10) as first_sender:
            await send_all(first_sender, [frame(i) for i in range(4)])
        before = await collect(receiver, 4)
        await asyncio.sleep(0.6)
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=10) as second_sender:
            await send_all(second_sender, [frame(i) for i in range(4)])  # its own pts start at 0 again
        after = await collect(receiver, 4)
        assert receiver.stats.source_changes == 1
    assert len(before) == 4 and len(after) == 4 and after[0].is_keyframe
    pts = [f.pts for f in before + after]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_joining_mid_stream_waits_for_a_keyframe() -> None:
    port = free_udp_port()
    with RtpSender("127.0.0.1", port, WIDTH, HEIGHT, FPS, gop=10) as sender:
        await send_all(sender, [frame(i) for i in range(4)])  # nobody listens yet
        async with RtpReceiver(local_description(port)) as receiver:
            await send_all(sender, [frame(i) for i in range(4, 15)])
            received = await collect(receiver, 5)
            stats = receiver.stats
    assert received[0].is_keyframe
    assert stats.access_units_dropped == 6  # pictures 4..9, before the IDR at 10
    assert len(received) == 5


async def test_receiver_from_sdp_file_and_errors(tmp_path: Path) -> None:
    port = free_udp_port()
    sdp = tmp_path / "in.sdp"
    sdp.write_text(local_description(port).to_sdp())
    receiver = RtpReceiver.from_sdp(sdp)
    assert receiver.port == port
    async with receiver:
        with pytest.raises(InputError, match=f"cannot listen for RTP on 127.0.0.1:{port}"):
            async with RtpReceiver.from_sdp(sdp):
                pass
    with pytest.raises(InputError, match="cannot read the SDP file"):
        RtpReceiver.from_sdp(tmp_path / "missing.sdp")
    garbage = tmp_path / "garbage.sdp"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(SdpError):
        RtpReceiver.from_sdp(garbage)


def test_sender_sdp_describes_the_stream() -> None:
    with RtpSender("127.0.0.1", 5600, WIDTH, HEIGHT, Fraction(30000, 1001)) as sender:
        text = sender.sdp()
    assert "m=video 5600 RTP/AVP 96" in text and "sprop-parameter-sets=" in text and "packetization-mode=1" in text
    description = parse_sdp(text)
    assert description.frame_rate == Fraction(30000, 1001)
    assert description.profile_level_id and len(description.sprop_parameter_sets) == 2


async def test_ffmpeg_rtp_muxer_stream_is_received() -> None:
    """A stream packetized by FFmpeg's own RTP muxer (through PyAV), not by our packetizer."""
    async with RtpReceiver(local_description()) as receiver:
        host, port = receiver.local_address
        consumer = collecting(receiver, 30)
        with av.open(f"rtp://{host}:{port}", "w", format="rtp") as output:
            video = output.add_stream("libx264", rate=FPS)
            video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            video.options = {"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "0", "tune": "zerolatency"}
            for i in range(30):
                picture_ = DecodedFrame.from_rgb(picture(i), ColourSpace("bt601")).to_av()
                picture_.pts, picture_.time_base = i, Fraction(1, FPS)
                output.mux(video.encode(picture_))
                await asyncio.sleep(0.005)
            output.mux(video.encode(None))
        received = await consumer
    assert len(received) >= 29
    assert [f.pts // TICKS for f in received if f.is_keyframe] == [0, 10, 20]


def test_ffmpeg_plays_our_stream_from_our_sdp(tmp_path: Path) -> None:
    """What `ffmpeg -protocol_whitelist file,udp,rtp -i out.sdp` does, through PyAV's SDP demuxer."""
    import threading

    port = free_udp_port()
    sender = RtpSender("127.0.0.1", port, WIDTH, HEIGHT, FPS, gop=10)
    sdp = tmp_path / "out.sdp"
    sdp.write_text(sender.sdp())
    stop = threading.Event()

    def play() -> None:
        index = 0
        while not stop.is_set() and index < 500:
            sender.send(frame(index))
            index += 1
            stop.wait(0.01)

    player = threading.Thread(target=play)
    options = {"protocol_whitelist": "file,udp,rtp"}
    with sender:
        player.start()
        try:
            with av.open(str(sdp), format="sdp", options=options, timeout=5) as container:
                decoded = []
                for picture_ in container.decode(video=0):
                    decoded.append(picture_)
                    if len(decoded) == 25:
                        break
        finally:
            stop.set()
            player.join()
    assert len(decoded) == 25
    assert (decoded[0].width, decoded[0].height) == (WIDTH, HEIGHT)
    assert any(p.key_frame for p in decoded)


async def test_slow_consumer_loses_old_frames_but_keeps_keyframes() -> None:
    async with RtpReceiver(local_description(), max_queued_frames=4) as receiver:
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=100) as sender:
            await send_all(sender, [frame(i) for i in range(12)])
        await asyncio.sleep(0.1)
        received = await collect(receiver, 4, timeout=1.0)
        stats = receiver.stats
    assert stats.frames_decoded == 12 and stats.frames_dropped == 8
    assert [f.pts // TICKS for f in received] == [0, 9, 10, 11]  # the keyframe stays, the oldest others go
    assert received[0].is_keyframe


async def test_decoder_overload_drops_the_backlog_and_resumes_at_a_keyframe() -> None:
    async with RtpReceiver(local_description(), max_queued_access_units=3) as receiver:
        decode = receiver._decoder.decode

        def slow_decode(unit, pts):
            import time

            time.sleep(0.03)
            return decode(unit, pts)

        receiver._decoder.decode = slow_decode
        consumer = collecting(receiver, 40, timeout=1.0)
        with RtpSender(*receiver.local_address, WIDTH, HEIGHT, FPS, gop=10) as sender:
            await send_all(sender, [frame(i) for i in range(40)], interval=0.002)
        received = await consumer
        stats = receiver.stats
    assert stats.access_units_dropped > 0
    assert 0 < len(received) < 40
    resumed = [f for previous, f in zip(received, received[1:]) if f.pts - previous.pts > TICKS]
    assert all(f.is_keyframe for f in resumed), "after a dropped backlog decoding resumes at a keyframe"
