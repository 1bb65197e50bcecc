"""`pipe` end to end on loopback: a real H.264 RTP sender, the pipe, and a real RTP receiver or y4m reader."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from clips import write_synthetic_clip
from kfgan_daemon.engine import EngineSettings, Outcome
from kfgan_daemon.errors import ConfigError, InputError
from kfgan_daemon.media.rtp import RtpReceiver
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.rtpapps.clipsender import EncodedClip, RtpClipSender, RtpClipSenderProcess, encode_clip
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.rtpapps.pipe import PipeHooks, PipeOptions, PipeSummary, SentFrame, run_pipe

pytestmark = pytest.mark.timeout(120)

FPS = 25


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def identity_generator() -> CropGenerator:
    """A real generator module (LiteGenerator starts as the identity); the synthetic clips have no face anyway."""
    torch.manual_seed(0)
    return CropGenerator(LiteGenerator())


@pytest.fixture(scope="module")
def synthetic_clip(tmp_path_factory: pytest.TempPathFactory) -> EncodedClip:
    path = write_synthetic_clip(tmp_path_factory.mktemp("pipe") / "synthetic.mp4", frames=50, width=320, height=240, gop=10)
    return encode_clip(path, gop=10, crf=28)


class Loopback:
    """A clip sender, the pipe between, and (for RTP outputs) a receiver of what the pipe sends."""

    def __init__(self, clip: EncodedClip, tmp_path: Path, output: str | None = None) -> None:
        self.sender = RtpClipSender(clip, "127.0.0.1", free_udp_port())
        self.input_sdp = tmp_path / "in.sdp"
        self.input_sdp.write_text(self.sender.session_description().to_sdp())
        self.output_port = free_udp_port()
        self.output = output or f"rtp://127.0.0.1:{self.output_port}"
        self.output_sdp = tmp_path / "out.sdp" if self.output != "-" else None
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.sent: list[SentFrame] = []

    def pipe(self, generator=None, **options) -> asyncio.Task[PipeSummary]:
        options.setdefault("handle_signals", False)
        pipe_options = {name: options.pop(name) for name in list(options) if name in PipeOptions.__dataclass_fields__}
        return asyncio.create_task(
            run_pipe(
                self.input_sdp,
                self.output,
                generator or identity_generator(),
                PipeOptions(output_sdp=self.output_sdp, **pipe_options),
                stop=self.stop,
                hooks=PipeHooks(on_sent=self.sent.append, on_ready=lambda receiver: self.ready.set()),
                **options,
            )
        )

    async def finish(self, task: asyncio.Task[PipeSummary], settle: float = 0.4) -> PipeSummary:
        await asyncio.sleep(settle)  # let the last frames through
        self.stop.set()
        return await asyncio.wait_for(task, 20)


async def receive_output(sdp: Path, stop: asyncio.Event) -> tuple[list, RtpReceiver]:
    frames = []
    receiver = RtpReceiver.from_sdp(sdp)
    await receiver.start()

    async def read() -> None:
        async for frame in receiver:
            frames.append(frame)

    reader = asyncio.create_task(read())
    await stop.wait()
    await asyncio.sleep(0.3)
    await receiver.close()
    await asyncio.gather(reader, return_exceptions=True)
    return frames, receiver


async def test_rtp_stream_through_the_pipe_comes_out_decodable_with_keyframes(
    synthetic_clip: EncodedClip, tmp_path: Path
) -> None:
    loop = Loopback(synthetic_clip, tmp_path)
    task = loop.pipe(encoder=EncodeOptions(crf=23, gop=10, preset="superfast"))
    await asyncio.wait_for(loop.ready.wait(), 10)
    out_done = asyncio.Event()
    output = asyncio.create_task(receive_output(loop.output_sdp, out_done))
    await asyncio.sleep(0.1)
    async with loop.sender as sender:
        report = await sender.play()
    summary = await loop.finish(task)
    out_done.set()
    frames, receiver = await output
    print("\n" + summary.describe())
    assert report.frames == 50
    # the pipe tagged every I-frame it received as a keyframe (from the decoder, not by counting)
    assert summary.engine.keyframes == sum(report.keyframes) == 5
    assert summary.receiver.keyframes == 5
    assert summary.frames_sent == summary.engine.received == 50
    # the output is real H.264 over RTP: an independent receiver decodes >= 95% of the frames, I-frames tagged
    assert len(frames) >= 0.95 * 50
    assert sum(frame.is_keyframe for frame in frames) >= 4
    assert (frames[0].width, frames[0].height) == (320, 240)
    assert "m=video" in loop.output_sdp.read_text()
    assert summary.latency_p95_ms is not None and summary.latency_p95_ms < 500
    # honest clocks: a frame's arrival is when its last packet came in (after the camera sent it),
    # taken by the receiver before decoding, and the latency counts from there
    sent_at = dict(zip(report.timestamps, report.sent_at))
    for item in loop.sent:
        assert sent_at[item.output.frame.pts] <= item.output.arrival == item.output.frame.arrival < item.sent_at


# What ``ffmpeg -i out.sdp`` does, through PyAV in another process: FFmpeg's own RTP demuxer
# and decoder, until two seconds pass without data. Prints "width height keyframe" per picture.
FFMPEG_PLAYER = """
import sys, av, av.error
options = {"protocol_whitelist": "file,udp,rtp", "reorder_queue_size": "0", "analyzeduration": "500000"}
container = av.open(sys.argv[1], format="sdp", options=options, timeout=(20, 2))
try:
    for picture in container.decode(video=0):
        print(picture.width, picture.height, int(picture.key_frame), flush=True)
except av.error.ExitError:
    pass
"""


@pytest.mark.slow
async def test_output_sdp_plays_in_ffmpeg(synthetic_clip: EncodedClip, tmp_path: Path) -> None:
    loop = Loopback(synthetic_clip, tmp_path)
    task = loop.pipe(encoder=EncodeOptions(crf=23, gop=10, preset="superfast"))
    await asyncio.wait_for(loop.ready.wait(), 10)
    player = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FFMPEG_PLAYER, str(loop.output_sdp), stdout=asyncio.subprocess.PIPE
    )
    await asyncio.sleep(1.0)  # FFmpeg opens the SDP and binds the port
    async with loop.sender as sender:
        await sender.play()
    summary = await loop.finish(task)
    output, _ = await asyncio.wait_for(player.communicate(), 30)
    pictures = [tuple(map(int, line.split())) for line in output.decode().splitlines()]
    assert summary.frames_sent == 50
    assert len(pictures) >= 48
    assert pictures[0][:2] == (320, 240)
    assert sum(keyframe for _, _, keyframe in pictures) >= 4  # our GOP of 10


async def test_y4m_output_on_stdout(synthetic_clip: EncodedClip, tmp_path: Path) -> None:
    loop = Loopback(synthetic_clip, tmp_path, output="-")
    stdout = io.BytesIO()
    task = loop.pipe(stdout=stdout)
    await asyncio.wait_for(loop.ready.wait(), 10)
    async with loop.sender as sender:
        await sender.play(frames=20)
    summary = await loop.finish(task)
    data = stdout.getvalue()
    header = data.split(b"\n", 1)[0].decode()
    assert header.startswith("YUV4MPEG2 W320 H240 F25:1")
    assert data.count(b"FRAME\n") == summary.frames_sent >= 19
    assert len(data) == len(header) + 1 + summary.frames_sent * (len(b"FRAME\n") + 320 * 240 * 3 // 2)


async def test_start_between_keyframes_loss_corruption_and_garbage_are_survived(
    synthetic_clip: EncodedClip, tmp_path: Path
) -> None:
    rng = np.random.default_rng(7)

    def damage(picture: int, number: int, datagram: bytes) -> bytes | None:
        if picture in (14, 33) and number == 0:
            return None  # lost packets
        if picture in (17, 26):  # corrupt H.264 payload behind an intact RTP header
            body = bytearray(datagram)
            body[13:] = rng.integers(0, 256, len(body) - 13, dtype=np.uint8).tobytes()
            return bytes(body)
        return datagram

    loop = Loopback(synthetic_clip, tmp_path)
    registry = CollectorRegistry()
    task = loop.pipe(registry=registry)
    await asyncio.wait_for(loop.ready.wait(), 10)
    async with loop.sender as sender:
        sender.send_raw(b"not rtp at all")
        sender.send_raw(b"\x80\x60\x00")  # truncated RTP header
        # start at frame 5: the first 5 pictures reference an I-frame the pipe never saw
        report = await sender.play(frames=45, start_frame=5, packet_filter=damage)
        sender.send_raw(b"\x80" * 7)
    await asyncio.sleep(0.3)
    # exported on the registry the service or --metrics-port serves
    assert registry.get_sample_value("kfgan_pipe_rtp_packets_malformed_total") >= 2
    assert registry.get_sample_value("kfgan_pipe_rtp_packets_lost_total") >= 1
    assert registry.get_sample_value("kfgan_engine_keyframes_total", {"stream": "pipe"}) >= 3
    # a live process: what was alive once it listened is out of the collector's scans (engine.heap)
    assert registry.get_sample_value("kfgan_gc_frozen_objects") >= gc.get_freeze_count() > 0
    summary = await loop.finish(task)
    assert registry.get_sample_value("kfgan_gc_frozen_objects") == gc.get_freeze_count() == 0
    print("\n" + summary.describe())
    rx = summary.receiver
    assert rx.packets_malformed >= 2 and rx.packets_lost >= 1
    assert rx.access_units_dropped >= 5  # waited for the first keyframe (frame 10)
    assert summary.engine.received >= 40 - 2 - 5  # everything decodable from frame 10 on, minus losses
    assert summary.frames_sent == summary.engine.received
    assert summary.engine.errors == 0
    assert report.dropped_packets == 2


async def test_sender_going_silent_is_reported_and_recovered_from(synthetic_clip: EncodedClip, tmp_path: Path) -> None:
    loop = Loopback(synthetic_clip, tmp_path)
    task = loop.pipe(silence_timeout=0.4)
    await asyncio.wait_for(loop.ready.wait(), 10)
    async with loop.sender as sender:
        await sender.play(frames=20)
        await asyncio.sleep(1.0)
        sent_before = len(loop.sent)
        assert task.done() is False
        assert sent_before >= 19
        await sender.play(frames=20, start_frame=20, first_timestamp=20 * 3600)
    summary = await loop.finish(task)
    # the pause (and perhaps the end of the stream, before the pipe was stopped) was reported
    assert summary.input_silences >= 1
    # and the frames after the pause came through again
    assert summary.frames_sent >= 39 and len(loop.sent) - sent_before >= 19


async def test_sigterm_stops_the_pipe_cleanly(synthetic_clip: EncodedClip, tmp_path: Path) -> None:
    loop = Loopback(synthetic_clip, tmp_path)
    task = loop.pipe(handle_signals=True)
    await asyncio.wait_for(loop.ready.wait(), 10)
    async with loop.sender as sender:
        await sender.play(frames=10)
    await asyncio.sleep(0.3)
    os.kill(os.getpid(), signal.SIGTERM)
    summary = await asyncio.wait_for(task, 10)
    assert summary.frames_sent >= 9
    assert summary.sender is not None and summary.sender.frames_sent == summary.frames_sent


async def test_bad_sdp_and_bad_output_are_clear_errors(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sdp"
    garbage.write_bytes(b"\x00\xffthis is not a session description")
    with pytest.raises(InputError, match="not an SDP"):
        await run_pipe(garbage, "-", identity_generator(), handle_signals=False)
    audio_only = tmp_path / "audio.sdp"
    audio_only.write_text("v=0\r\nc=IN IP4 127.0.0.1\r\nm=audio 5004 RTP/AVP 0\r\n")
    with pytest.raises(InputError, match="no video"):
        await run_pipe(audio_only, "-", identity_generator(), handle_signals=False)
    with pytest.raises(InputError, match="cannot read"):
        await run_pipe(tmp_path / "missing.sdp", "-", identity_generator(), handle_signals=False)
    valid = tmp_path / "in.sdp"
    valid.write_text(f"v=0\r\nc=IN IP4 127.0.0.1\r\nm=video {free_udp_port()} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
    with pytest.raises(ConfigError, match="output"):
        await run_pipe(valid, "udp://127.0.0.1:5000", identity_generator(), handle_signals=False)
    with pytest.raises(ConfigError, match="IP address"):
        await run_pipe(valid, "rtp://localhost:5000", identity_generator(), handle_signals=False)
    with pytest.raises(ConfigError, match="policy"):
        await run_pipe(valid, "-", identity_generator(), PipeOptions(policy="queue"), handle_signals=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="loss-policy"):
        await run_pipe(valid, "-", identity_generator(), PipeOptions(loss_policy="ignore"), handle_signals=False)  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        busy = tmp_path / "busy.sdp"
        port = taken.getsockname()[1]
        busy.write_text(f"v=0\r\nc=IN IP4 127.0.0.1\r\nm=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
        with pytest.raises(InputError, match="cannot listen"):
            await run_pipe(busy, "-", identity_generator(), handle_signals=False)


@pytest.mark.shared
@pytest.mark.slow
async def test_pipe_restores_a_real_face(media_dir: Path, tmp_path: Path) -> None:
    from test_engine_real import lite_generator

    clip = encode_clip(media_dir / "d12.mp4", max_frames=50, crf=40, gop=10)
    loop = Loopback(clip, tmp_path, output="-")
    stdout = io.BytesIO()
    task = loop.pipe(generator=lite_generator(), stdout=stdout, engine_settings=EngineSettings(max_latency=0.25))
    await asyncio.wait_for(loop.ready.wait(), 10)
    async with loop.sender as sender:
        await sender.play()
    summary = await loop.finish(task, settle=0.6)
    print("\n" + summary.describe())
    restored = [item for item in loop.sent if item.output.outcome is Outcome.RESTORED]
    assert summary.frames_sent >= 0.95 * 50
    # How many are restored is the plan's to decide from this machine's load (other programs included);
    # every frame after the first restored one carries a correction if it is not restored itself.
    assert len(restored) >= 5, summary.engine
    first = min(item.output.frame.index for item in restored)
    later = [item for item in loop.sent if item.output.frame.index > first]
    carried = [item for item in later if item.output.outcome is Outcome.CARRIED_FORWARD]
    assert len(restored) + len(carried) >= 0.9 * (len(later) + 1), summary.engine
    assert summary.engine.keyframes == 5


async def test_live_bench_measures_latency_and_sustained_rate(tmp_path: Path) -> None:
    from kfgan_daemon.rtpapps.livebench import live_bench

    clip = write_synthetic_clip(tmp_path / "bench.mp4", frames=25, width=320, height=240, gop=25)
    result = await live_bench(clip, identity_generator(), seconds=2.0, warmup=0.5, fps=FPS)
    print("\n" + result.describe())
    assert (result.width, result.height, result.target_fps) == (320, 240, 25.0)
    assert 45 <= result.frames_sent <= 55
    assert result.frames_received >= 0.9 * result.frames_sent
    assert result.frames_out == (
        result.restored + result.carried_forward + result.no_face + result.no_keyframe + result.shed + result.errors
    )
    assert result.load_average is not None
    assert result.latency_p50_ms is not None and 0 < result.latency_p50_ms <= result.latency_p95_ms < 1000
    assert 20 <= result.sustained_fps <= 30
    assert "total" in result.stage_ms and "prepare" in result.stage_ms
    # counted over the measured period only (test_engine_heap checks the counting itself)
    assert set(result.collections) == {0, 1, 2}
    assert all(count >= 0 and total_ms >= 0 for count, total_ms in result.collections.values())
    assert "garbage collections: generation 0" in result.describe()
    # figures comparable across machines: the machine's own speed and the cores this process kept busy
    assert result.generator_ms_one_thread is not None and result.generator_ms_one_thread > 0
    assert result.cores_used is not None and 0 < result.cores_used <= os.cpu_count()
    assert "ms per crop on one torch thread" in result.describe()
    assert f"frames ({result.cores_used:.2f} cores used)" in result.describe()
    assert {"generator_ms_one_thread", "cores_used", "camera_pids"} <= set(result.to_dict())
    # the camera sent from a process of its own, which has ended with the bench
    assert len(result.camera_pids) == 1 and os.getpid() not in result.camera_pids
    assert not process_exists(result.camera_pids[0])


async def test_live_bench_sends_two_cameras_through_one_engine(tmp_path: Path) -> None:
    from kfgan_daemon.rtpapps.livebench import live_bench

    clip = write_synthetic_clip(tmp_path / "bench.mp4", frames=25, width=320, height=240, gop=25)
    result = await live_bench(clip, identity_generator(), seconds=1.5, warmup=0.5, fps=FPS, streams=2)
    print("\n" + result.describe())
    assert result.streams == 2
    assert 2 * 34 <= result.frames_sent <= 2 * 41  # both cameras counted
    assert result.frames_received >= 0.9 * result.frames_sent
    assert 20 <= result.sustained_fps <= 30  # the slower of the two
    assert len(set(result.camera_pids)) == 2 and os.getpid() not in result.camera_pids  # a process per camera


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_camera_process_sends_on_the_schedule_it_was_given(synthetic_clip: EncodedClip) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.setblocking(False)
        async with RtpClipSenderProcess(synthetic_clip, "127.0.0.1", receiver.getsockname()[1]) as camera:
            assert camera.pid is not None and camera.pid != os.getpid()
            start_at = time.monotonic() + 0.2
            report = await camera.play(frames=10, start_at=start_at)
            pid = camera.pid
        datagrams = 0
        with contextlib.suppress(BlockingIOError):
            while receiver.recv(2048):
                datagrams += 1
    assert report.pid == pid
    assert report.started_at == start_at
    assert report.frames == 10 and report.packets == datagrams > 0
    # its clock is this process's (CLOCK_MONOTONIC is system-wide): due and sent times line up with ours
    assert report.scheduled_at == pytest.approx([start_at + n / FPS for n in range(10)])
    assert all(due <= sent < time.monotonic() for due, sent in zip(report.scheduled_at, report.sent_at))
    assert not process_exists(pid)


async def test_camera_process_stops_with_the_block_that_started_it(synthetic_clip: EncodedClip) -> None:
    async with RtpClipSenderProcess(synthetic_clip, "127.0.0.1", free_udp_port()) as camera:
        pid = camera.pid
        play = asyncio.create_task(camera.play(seconds=60))
        await asyncio.sleep(0.3)
        play.cancel()
    with pytest.raises(asyncio.CancelledError):
        await play
    assert pid is not None and not process_exists(pid)
