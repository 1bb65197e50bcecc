"""``kfgan-daemon bench --live``: a clip sent as real-time H.264 RTP through the pipe on loopback.

What is measured, per frame: from the moment the camera was due to send it
(start + n / rate, the camera's own clock) to the moment the pipe's encoder and
socket had sent its output picture: the latency the daemon adds on a call. Each
fake camera sends from a process of its own
(:class:`~kfgan_daemon.rtpapps.clipsender.RtpClipSenderProcess`), so that an
event loop stalled by the pipe cannot delay the camera and hide its own stall;
the camera reports its start and each frame's send time (``time.monotonic()``,
system-wide on Linux), and latency still counts from the schedule, so that a
camera delayed by the machine shows as its own leg rather than vanishing. And
the frame rate the pipe's output sustains, counted by a separate socket that
receives it. The clip is encoded once before the run so that the cameras cost
almost nothing; the first ``warmup`` seconds (model and detector start-up) are
sent but not counted. Recorded with the result, since on a shared machine the
numbers mean little without them: the load average, the cores this process kept
busy (the cameras' processes not included), and the generator's milliseconds per
crop on one torch thread, measured before the run, which compares machines.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kfgan_daemon.bench import describe_machine_speed, measure_generator_ms_one_thread
from kfgan_daemon.engine.heap import CollectorControl
from kfgan_daemon.engine.planner import PlanSummary
from kfgan_daemon.engine.settings import EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import Outcome
from kfgan_daemon.errors import ConfigError
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.process import DaemonProcess, Runtime
from kfgan_daemon.rtpapps.clipsender import EncodedClip, RtpClipSenderProcess, PlayReport, encode_clip
from kfgan_daemon.rtpapps.pipe import (
    PIPE_ENCODE,
    PIPE_MAX_LATENCY,
    PipeHooks,
    PipeOptions,
    PipeSummary,
    RtpPipe,
    SentFrame,
)

if TYPE_CHECKING:
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

# The cameras' common start is this far ahead of telling them, so that each has heard before it is due.
CAMERA_START_MARGIN = 0.2


@dataclass(slots=True)
class LiveBenchResult:
    clip: str
    width: int
    height: int
    target_fps: float
    seconds: float  # measured period (after the warm-up)
    frames_sent: int  # by the fake camera in the measured period
    frames_out: int  # output by the pipe, in the measured period
    frames_received: int  # of the pipe's output, by a separate socket, in the measured period
    restored: int
    carried_forward: int  # too late to restore: the last correction carried onto them
    no_face: int
    no_keyframe: int
    shed: int  # too late to restore, nothing to carry: sent unrestored
    dropped: int  # sent by the camera, never output (overload with policy drop, or lost)
    errors: int  # an exception on the frame: sent unrestored
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_max_ms: float | None
    sustained_fps: float  # output frames per second at the receiving socket (the slowest stream's)
    policy: str
    generator: str
    cpu_ms_per_frame: float | None = None  # this process's CPU time per frame sent, all threads
    cores_used: float | None = None  # this process's CPU time over the measured period's wall time
    # CPU ms per frame by thread role (engine face threads, inference, decode, output, event loop):
    # how the work spreads over the cores
    thread_cpu_ms: dict[str, float] = field(default_factory=dict)
    stage_ms: dict[str, float] = field(default_factory=dict)  # engine stage medians
    load_average: tuple[float, float, float] | None = None  # os.getloadavg() when the measurement ended
    streams: int = 1  # cameras sending at once through one engine; counts are over all of them
    # Where the added latency goes, (median, p95) ms of each leg: "camera late" (due -> its last packet
    # sent: the camera process's own delay, from the machine's scheduler), "network" (sent -> arrived),
    # "engine" (arrived -> output ready: decode, face stage, generator, paste), "output" (ready ->
    # encoded and sent)
    latency_legs_ms: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Garbage collections in the measured period by generation, (count, ms in all): each holds the GIL,
    # a pause of every stream (start-up objects are frozen out of them, as in the daemon)
    collections: dict[int, tuple[int, float]] = field(default_factory=dict)
    # The machine's speed, to compare figures across machines: generator ms per crop, batch 1, one
    # torch thread, measured before the run (kfgan_daemon.bench.measure_generator_ms_one_thread)
    generator_ms_one_thread: float | None = None
    camera_pids: list[int] = field(default_factory=list)  # the cameras' own processes, one each
    plan: PlanSummary | None = None  # the engine's plan as the measured period ended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def percent(self, count: int) -> float:
        """``count`` as a percentage of the frames the camera sent in the measured period."""
        return 100.0 * count / self.frames_sent if self.frames_sent else 0.0

    def describe(self) -> str:
        def ms(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.1f} ms"

        stages = ", ".join(f"{name} {value:.1f} ms" for name, value in self.stage_ms.items())
        load = "n/a" if self.load_average is None else " ".join(f"{value:.2f}" for value in self.load_average)
        cores = "n/a" if self.cores_used is None else f"{self.cores_used:.2f}"
        machine = "n/a" if self.generator_ms_one_thread is None else describe_machine_speed(self.generator_ms_one_thread)
        return "\n".join(
            [
                f"live bench: {self.clip} as {self.streams} x {self.width}x{self.height} H.264 RTP at {self.target_fps:g} FPS "
                f"for {self.seconds:.1f} s ({self.generator}, overload policy {self.policy}; load average {load})",
                f"  machine: {machine}",
                f"  added latency per frame, from its scheduled send time: median {ms(self.latency_p50_ms)}, "
                f"p95 {ms(self.latency_p95_ms)}, max {ms(self.latency_max_ms)}",
                "  legs (median/p95): "
                + ", ".join(f"{name} {p50:.1f}/{p95:.1f} ms" for name, (p50, p95) in self.latency_legs_ms.items()),
                f"  sustained output: {self.sustained_fps:.1f} FPS ({self.frames_received} frames received of "
                f"{self.frames_sent} sent)",
                f"  frames ({cores} cores used): {self.restored} restored ({self.percent(self.restored):.1f}%), "
                f"{self.carried_forward} carried forward ({self.percent(self.carried_forward):.1f}%), {self.shed} shed "
                f"unrestored ({self.percent(self.shed):.1f}%), {self.no_face} without a face, {self.no_keyframe} before "
                f"a keyframe, {self.dropped} dropped, {self.errors} errors",
                f"  CPU: {self.cpu_ms_per_frame:.1f} ms per frame (all threads of the process, {cores} cores used; "
                "the cameras' processes not included): "
                + ", ".join(f"{name} {value:.1f}" for name, value in self.thread_cpu_ms.items())
                if self.cpu_ms_per_frame is not None
                else "  CPU: not measured",
                f"  engine stages (median): {stages}" if stages else "  engine stages: none measured",
                "  garbage collections: "
                + ", ".join(f"generation {generation} {count} ({total_ms:.1f} ms in all)"
                            for generation, (count, total_ms) in self.collections.items()),
                f"  plan: {self.plan.describe()}" if self.plan is not None else "  plan: none",
            ]
        )


class _OutputCounter(asyncio.DatagramProtocol):
    """Counts the pipe's output pictures (RTP packets with the marker bit) and when each arrived."""

    def __init__(self) -> None:
        self.frames: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) >= 12 and data[1] & 0x80 and not 192 <= data[1] <= 223:
            self.frames.append(time.monotonic())


@dataclass(slots=True)
class _Lane:
    """One camera, its pipe (a stream of the shared engine) and the socket counting what comes out."""

    sender: RtpClipSenderProcess
    counter: _OutputCounter
    transport: asyncio.DatagramTransport
    pipe: RtpPipe | None = None
    sent: list[SentFrame] = field(default_factory=list)

    @property
    def output(self) -> str:
        return f"rtp://127.0.0.1:{self.transport.get_extra_info('sockname')[1]}"


@dataclass(slots=True)
class _Measured:
    """What the measured period left behind, read into a :class:`LiveBenchResult` after the process stops."""

    reports: list[PlayReport]
    plan: PlanSummary
    cpu_seconds: float
    wall_seconds: float
    threads_before: dict[str, float]
    threads_after: dict[str, float]
    collections_before: dict[int, tuple[int, float]]
    collections_after: dict[int, tuple[int, float]]


@dataclass(frozen=True, slots=True)
class _BenchPlan:
    """The bench's parameters, as given."""

    rate: Fraction | None
    size: tuple[int, int] | None
    warmup: float
    seconds: float
    crf: int
    gop: int | None
    policy: OverloadPolicy
    restore_settings: "RestoreSettings | None"
    output_encoder: EncodeOptions
    streams: int

    @property
    def total_seconds(self) -> float:
        return self.warmup + self.seconds


class LiveBenchMode:
    """The live bench as a mode of :class:`~kfgan_daemon.process.DaemonProcess`, so that it starts,
    warms and stops the engine exactly as ``pipe`` and ``serve`` do: cameras in processes of their own,
    one :class:`RtpPipe` each on the shared engine, observed through the pipe's hooks."""

    name = "live bench"

    def __init__(self, clip: Path, generator: "BatchGenerator", plan: _BenchPlan) -> None:
        self.clip = clip
        self.generator = generator
        self.plan = plan
        self.encoded: EncodedClip | None = None
        self.machine_ms: float | None = None
        self.lanes: list[_Lane] = []
        self.measured: _Measured | None = None
        self.summaries: list[PipeSummary] = []
        self._runtime: Runtime | None = None
        self._folder = tempfile.TemporaryDirectory(prefix="kfgan-livebench-")

    async def prepare(self) -> None:
        plan = self.plan
        self.encoded = await asyncio.get_running_loop().run_in_executor(
            None,
            lambda: encode_clip(
                self.clip,
                size=plan.size,
                frame_rate=plan.rate,
                crf=plan.crf,
                gop=plan.gop or round(2 * (plan.rate or 25)),
                max_frames=None if plan.rate is None else int(plan.total_seconds * plan.rate) + 1,
            ),
        )
        # Before the engine starts: the torch thread count is process-wide, so nothing else may use torch meanwhile.
        self.machine_ms = measure_generator_ms_one_thread(self.generator)
        loop = asyncio.get_running_loop()
        for n in range(1, plan.streams + 1):
            counter = _OutputCounter()
            transport, _ = await loop.create_datagram_endpoint(lambda c=counter: c, local_addr=("127.0.0.1", 0))
            lane = _Lane(RtpClipSenderProcess(self.encoded, "127.0.0.1", _free_udp_port()), counter, transport)
            self.lanes.append(lane)
            input_sdp = Path(self._folder.name) / f"in-{n}.sdp"
            input_sdp.write_text(lane.sender.session_description().to_sdp())
            lane.pipe = RtpPipe(
                input_sdp,
                lane.output,
                PipeOptions(encoder=plan.output_encoder, policy=plan.policy),
                stream_id=f"pipe-{n}",
                restore_settings=plan.restore_settings,
                hooks=PipeHooks(on_sent=lane.sent.append),
            )

    async def start(self, runtime: Runtime) -> None:
        self._runtime = runtime
        for lane in self.lanes:
            assert lane.pipe is not None
            await lane.pipe.open(runtime.engine)

    async def run(self) -> None:
        assert self._runtime is not None
        pipes = [asyncio.create_task(lane.pipe.run()) for lane in self.lanes if lane.pipe is not None]
        try:
            self.measured = await self._measure(self._runtime)
            await asyncio.sleep(max(0.5, 2 * self._runtime.engine.settings.max_latency))  # the last frames out
        finally:
            await self.drain()
            await asyncio.gather(*pipes, return_exceptions=True)
        self.summaries = [lane.pipe.summary() for lane in self.lanes if lane.pipe is not None]

    async def _measure(self, runtime: Runtime) -> _Measured:
        warmup = self.plan.warmup
        async with contextlib.AsyncExitStack() as cameras:
            for lane in self.lanes:
                await cameras.enter_async_context(lane.sender)
            start_at = time.monotonic() + CAMERA_START_MARGIN
            measurement = asyncio.create_task(_measurement_start(start_at + warmup, runtime.collector))
            plays = [
                asyncio.create_task(lane.sender.play(seconds=self.plan.total_seconds, start_at=start_at))
                for lane in self.lanes
            ]
            try:
                reports = await asyncio.gather(*plays)
                plan = runtime.engine.planner.summary()
                threads_before, process_before, collections_before, measured_since = await measurement
            finally:
                # After an error, before the cameras stop: no task may still wait on a closed pipe.
                for task in (measurement, *plays):
                    task.cancel()
        return _Measured(
            reports=list(reports),
            plan=plan,
            cpu_seconds=time.process_time() - process_before,
            wall_seconds=time.monotonic() - measured_since,
            threads_before=threads_before,
            threads_after=_thread_cpu_seconds(),
            collections_before=collections_before,
            collections_after=runtime.collector.pause_totals(),
        )

    async def drain(self) -> None:
        await asyncio.gather(*(lane.pipe.finish() for lane in self.lanes if lane.pipe is not None))

    async def close(self) -> None:
        for lane in self.lanes:
            if lane.pipe is not None:
                await lane.pipe.close()
            lane.transport.close()
        self._folder.cleanup()

    def ready_status(self) -> str:
        return f"live bench of {self.clip.name}, {len(self.lanes)} camera(s)"


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
    output_encoder: EncodeOptions = PIPE_ENCODE,
    streams: int = 1,
) -> LiveBenchResult:
    """Send ``clip`` (looped, resized to ``size`` = (width, height), at ``fps`` or its own rate) through
    the pipe for ``warmup + seconds`` and measure the last ``seconds``.

    ``streams`` cameras send at once, each through a pipe of its own, all sharing one
    engine (their faces batched on one generator): how many calls a machine carries.
    """
    if streams < 1:
        raise ConfigError("streams: must be at least 1")
    plan = _BenchPlan(
        rate=Fraction(fps).limit_denominator(1001) if fps is not None else None,
        size=size, warmup=warmup, seconds=seconds, crf=crf, gop=gop, policy=policy,
        restore_settings=restore_settings, output_encoder=output_encoder, streams=streams,
    )
    mode = LiveBenchMode(clip, generator, plan)
    await DaemonProcess(
        mode,
        generator,
        engine_settings=engine_settings or EngineSettings(max_latency=PIPE_MAX_LATENCY),
        restore_settings=restore_settings,
        handle_signals=False,
    ).serve()
    assert mode.measured is not None and mode.encoded is not None
    return _result(mode, plan, mode.measured)


def _result(mode: LiveBenchMode, plan: _BenchPlan, measured: _Measured) -> LiveBenchResult:
    """The measured period's frames, latencies and costs, over every lane."""
    warmup = plan.warmup
    latencies: list[float] = []
    legs: dict[str, list[float]] = {"camera late": [], "network": [], "engine": [], "output": []}
    outcomes: list[Outcome] = []
    frames_sent = frames_out = frames_received = 0
    rates = []
    for lane, report in zip(mode.lanes, measured.reports):
        measured_from = report.started_at + warmup
        due = dict(zip(report.timestamps, report.scheduled_at))
        sent_at = dict(zip(report.timestamps, report.sent_at))
        frames = [item for item in lane.sent if due.get(item.output.frame.pts, 0.0) >= measured_from]
        for item in frames:
            pts = item.output.frame.pts
            latencies.append(item.sent_at - due[pts])
            legs["camera late"].append(sent_at[pts] - due[pts])
            legs["network"].append(item.output.arrival - sent_at[pts])
            legs["engine"].append(item.output.emitted - item.output.arrival)
            legs["output"].append(item.sent_at - item.output.emitted)
        outcomes += [item.output.outcome for item in frames]
        frames_sent += sum(1 for at in report.scheduled_at if at >= measured_from)
        frames_out += len(frames)
        received = [at for at in lane.counter.frames if at >= measured_from]
        frames_received += len(received)
        rates.append(_rate(received))
    cpu_ms_per_frame = 1000 * measured.cpu_seconds / frames_sent if frames_sent else None
    thread_cpu_ms = {
        role: 1000 * (seconds - measured.threads_before.get(role, 0.0)) / frames_sent
        for role, seconds in measured.threads_after.items()
        if frames_sent
    }
    for summary in mode.summaries:
        log.info("live bench pipe summary: %s", summary.describe())
    encoded = mode.encoded
    assert encoded is not None
    return LiveBenchResult(
        clip=str(mode.clip),
        width=encoded.width,
        height=encoded.height,
        target_fps=float(encoded.frame_rate),
        seconds=plan.seconds,
        frames_sent=frames_sent,
        frames_out=frames_out,
        frames_received=frames_received,
        restored=outcomes.count(Outcome.RESTORED),
        carried_forward=outcomes.count(Outcome.CARRIED_FORWARD),
        no_face=outcomes.count(Outcome.NO_FACE),
        no_keyframe=outcomes.count(Outcome.NO_KEYFRAME),
        shed=outcomes.count(Outcome.SHED),
        errors=outcomes.count(Outcome.ERROR),
        dropped=max(0, frames_sent - frames_out),
        latency_p50_ms=_quantile_ms(latencies, 0.5),
        latency_p95_ms=_quantile_ms(latencies, 0.95),
        latency_max_ms=_quantile_ms(latencies, 1.0),
        latency_legs_ms={
            name: (float(np.median(values) * 1000), float(np.quantile(values, 0.95) * 1000))
            for name, values in legs.items()
            if values
        },
        sustained_fps=min(rates),
        policy=plan.policy,
        generator=type(getattr(mode.generator, "module", mode.generator)).__name__,
        cpu_ms_per_frame=cpu_ms_per_frame,
        cores_used=measured.cpu_seconds / measured.wall_seconds,
        thread_cpu_ms=dict(sorted(thread_cpu_ms.items(), key=lambda item: -item[1])),
        stage_ms=mode.summaries[0].stage_median_ms,
        load_average=os.getloadavg(),
        streams=plan.streams,
        plan=measured.plan,
        collections={
            generation: (count - measured.collections_before[generation][0],
                         1000 * (seconds_in_all - measured.collections_before[generation][1]))
            for generation, (count, seconds_in_all) in measured.collections_after.items()
        },
        generator_ms_one_thread=mode.machine_ms,
        camera_pids=[report.pid for report in measured.reports],
    )


async def _measurement_start(
    at: float, gc_control: CollectorControl
) -> tuple[dict[str, float], float, dict[int, tuple[int, float]], float]:
    """CPU times by thread role, the process's CPU time, the collections so far and the time, at ``at``
    (``time.monotonic()``)."""
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    return _thread_cpu_seconds(), time.process_time(), gc_control.pause_totals(), time.monotonic()


def _thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's threads, summed by role: a Python thread's name less its
    number, "event loop" for the main thread, "native" for threads of C libraries (x264's and
    FFmpeg's own threads, OpenMP). Linux only (``/proc/self/task``); elsewhere empty. Threads
    that ended are not counted."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    names = {
        thread.native_id: (
            "event loop" if thread is threading.main_thread() else thread.name.rstrip("0123456789").rstrip("_-")
        )
        for thread in threading.enumerate()
    }
    roles: dict[str, float] = {}
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return roles
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        role = names.get(int(task), "native")
        roles[role] = roles.get(role, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return roles


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
