"""``kfgan-daemon bench --live``: a clip sent as real-time H.264 RTP through the pipe on loopback.

What is measured, per frame: from the moment the sender put the frame's last
RTP packet on the socket (the receive of that packet, on loopback, to within
tens of microseconds) to the moment the pipe's encoder and socket had sent its
restored picture: the latency the daemon adds on a call. And the frame rate the
pipe's output sustains, counted by a separate socket that receives it. The clip
is encoded once before the run so that the fake camera costs almost nothing;
the first ``warmup`` seconds (model and detector start-up) are sent but not
counted.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kfgan_daemon.engine.pipe import EncoderOptions, SentFrame, run_pipe
from kfgan_daemon.engine.rtpclip import RtpClipSender, encode_clip
from kfgan_daemon.engine.settings import EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import Outcome

if TYPE_CHECKING:
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LiveBenchResult:
    clip: str
    width: int
    height: int
    target_fps: float
    seconds: float  # measured period (after the warm-up)
    frames_sent: int  # by the fake camera in the measured period
    frames_out: int  # restored or passed through by the pipe, in the measured period
    frames_received: int  # of the pipe's output, by a separate socket, in the measured period
    restored: int
    skipped: int  # no face or no keyframe yet
    passthrough: int
    dropped: int  # sent by the camera, never output (overload with policy drop, or lost)
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_max_ms: float | None
    sustained_fps: float  # output frames per second at the receiving socket
    policy: str
    generator: str
    cpu_ms_per_frame: float | None = None  # this process's CPU time per frame sent, all threads
    stage_ms: dict[str, float] = field(default_factory=dict)  # engine stage medians

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f} ms"

        stages = ", ".join(f"{name} {value:.1f} ms" for name, value in self.stage_ms.items())
        return "\n".join(
            [
                f"live bench: {self.clip} as {self.width}x{self.height} H.264 RTP at {self.target_fps:g} FPS "
                f"for {self.seconds:.1f} s ({self.generator}, overload policy {self.policy})",
                f"  added latency per frame: median {ms(self.latency_p50_ms)}, p95 {ms(self.latency_p95_ms)}, "
                f"max {ms(self.latency_max_ms)}",
                f"  sustained output: {self.sustained_fps:.1f} FPS ({self.frames_received} frames received of "
                f"{self.frames_sent} sent)",
                f"  frames: {self.restored} restored, {self.skipped} without face/keyframe, {self.passthrough} "
                f"passed through unrestored (late), {self.dropped} dropped",
                f"  CPU: {self.cpu_ms_per_frame:.1f} ms per frame (all threads of the process)"
                if self.cpu_ms_per_frame is not None
                else "  CPU: not measured",
                f"  engine stages (median): {stages}" if stages else "  engine stages: none measured",
            ]
        )


class _OutputCounter(asyncio.DatagramProtocol):
    """Counts the pipe's output pictures (RTP packets with the marker bit) and when each arrived."""

    def __init__(self) -> None:
        self.frames: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) >= 12 and data[1] & 0x80 and not 192 <= data[1] <= 223:
            self.frames.append(time.monotonic())


async def live_bench(
    clip: Path,
    generator: "BatchGenerator",
    seconds: float = 10.0,
    fps: float | None = None,
    *,
    size: tuple[int, int] | None = None,
    warmup: float = 2.0,
    crf: int = 30,
    gop: int | None = None,
    policy: OverloadPolicy = "passthrough",
    engine_settings: EngineSettings | None = None,
    restore_settings: "RestoreSettings | None" = None,
    output_encoder: EncoderOptions = EncoderOptions(),
) -> LiveBenchResult:
    """Send ``clip`` (looped, resized to ``size`` = (width, height), at ``fps`` or its own rate) through
    the pipe for ``warmup + seconds`` and measure the last ``seconds``."""
    rate = Fraction(fps).limit_denominator(1001) if fps is not None else None
    total_seconds = warmup + seconds
    loop = asyncio.get_running_loop()
    encoded = await loop.run_in_executor(
        None,
        lambda: encode_clip(
            clip,
            size=size,
            frame_rate=rate,
            crf=crf,
            gop=gop or round(2 * (rate or 25)),
            max_frames=None if rate is None else int(total_seconds * rate) + 1,
        ),
    )
    rate = encoded.frame_rate
    counter = _OutputCounter()
    counter_transport, _ = await loop.create_datagram_endpoint(lambda: counter, local_addr=("127.0.0.1", 0))
    output_port = counter_transport.get_extra_info("sockname")[1]
    sent: list[SentFrame] = []
    stop = asyncio.Event()
    ready = asyncio.Event()
    with tempfile.TemporaryDirectory(prefix="kfgan-livebench-") as folder:
        sender = RtpClipSender(encoded, "127.0.0.1", _free_udp_port())
        input_sdp = Path(folder) / "in.sdp"
        input_sdp.write_text(sender.session_description().to_sdp())
        pipe = asyncio.create_task(
            run_pipe(
                input_sdp,
                f"rtp://127.0.0.1:{output_port}",
                generator,
                encoder=output_encoder,
                policy=policy,
                engine_settings=engine_settings,
                restore_settings=restore_settings,
                stop=stop,
                on_sent=sent.append,
                on_ready=lambda _: ready.set(),
                handle_signals=False,
            ),
            name="kfgan-livebench-pipe",
        )
        try:
            await asyncio.wait_for(ready.wait(), 30)
            cpu_start = asyncio.create_task(_process_time_after(warmup))
            async with sender:
                report = await sender.play(seconds=total_seconds)
            cpu_seconds = time.process_time() - await cpu_start
            await asyncio.sleep(max(0.5, 2 * (engine_settings or EngineSettings()).max_latency))
        finally:
            stop.set()
            summary = await pipe
            counter_transport.close()
    measured_from = report.sent_at[0] + warmup if report.sent_at else 0.0
    sent_at = {timestamp: at for timestamp, at in zip(report.timestamps, report.sent_at)}
    measured = [item for item in sent if sent_at.get(item.output.frame.pts, 0.0) >= measured_from]
    latencies = [item.sent_at - sent_at[item.output.frame.pts] for item in measured]
    frames_sent = sum(1 for at in report.sent_at if at >= measured_from)
    received = [at for at in counter.frames if at >= measured_from]
    outcomes = [item.output.outcome for item in measured]
    cpu_ms_per_frame = 1000 * cpu_seconds / frames_sent if frames_sent else None
    log.info("live bench pipe summary: %s", summary.describe())
    return LiveBenchResult(
        clip=str(clip),
        width=encoded.width,
        height=encoded.height,
        target_fps=float(rate),
        seconds=seconds,
        frames_sent=frames_sent,
        frames_out=len(measured),
        frames_received=len(received),
        restored=outcomes.count(Outcome.RESTORED),
        skipped=outcomes.count(Outcome.SKIPPED),
        passthrough=outcomes.count(Outcome.PASSTHROUGH),
        dropped=max(0, frames_sent - len(measured)),
        latency_p50_ms=_quantile_ms(latencies, 0.5),
        latency_p95_ms=_quantile_ms(latencies, 0.95),
        latency_max_ms=_quantile_ms(latencies, 1.0),
        sustained_fps=_rate(received),
        policy=policy,
        generator=type(getattr(generator, "module", generator)).__name__,
        cpu_ms_per_frame=cpu_ms_per_frame,
        stage_ms=summary.stage_median_ms,
    )


async def _process_time_after(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return time.process_time()


def _quantile_ms(values: list[float], q: float) -> float | None:
    return float(np.quantile(values, q) * 1000) if values else None


def _rate(times: list[float]) -> float:
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
