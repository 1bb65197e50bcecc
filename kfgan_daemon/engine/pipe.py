"""``kfgan-daemon pipe``: H.264 RTP in (an SDP file), restored video out as H.264 RTP or y4m on stdout.

    receiver (UDP socket, decode at the marker bit) -> engine stream (real time) -> RTP sender / Y4M writer

The receiver waits for a keyframe at start-up, conceals or waits out packet
loss, and reports a sender that went silent (and its return); the engine keeps
the added latency bounded; the output encoder runs on its own thread. SIGINT
and SIGTERM stop the pipe cleanly: frames already decoded still go out (for up
to ``drain_timeout``), the encoder is flushed, sockets are closed.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

import cv2
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from kfgan_daemon.engine.engine import StreamEngine
from kfgan_daemon.engine.metrics import LATENCY_BUCKETS
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import StreamOutput, StreamStats
from kfgan_daemon.errors import ConfigError, OutputError
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.rtp import (
    H264SessionDescription,
    ReceiverState,
    ReceiverStatus,
    RtpReceiver,
    RtpReceiverStats,
    RtpSender,
    RtpSenderStats,
)
from kfgan_daemon.media.rtp.decoder import RTP_VIDEO_TIME_BASE, LossPolicy
from kfgan_daemon.media.y4m import Y4MWriter

if TYPE_CHECKING:
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

DEFAULT_FRAME_RATE = Fraction(30)
STREAM_ID = "pipe"
# The engine's share of a 120 ms budget from last packet in to packet out: decoding
# and re-encoding a 720p picture on a small CPU take most of the rest.
PIPE_MAX_LATENCY = 0.08
LOSS_POLICIES = ("conceal", "wait_keyframe")


# ---- where the output goes ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """``rtp://HOST:PORT`` (host an IP address) or ``-`` (y4m on stdout)."""

    kind: str  # "rtp" or "y4m"
    host: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, output: str) -> "OutputTarget":
        if output == "-":
            return cls("y4m")
        parts = urlsplit(output)
        if parts.scheme != "rtp":
            raise ConfigError(f"output: {output!r} is neither rtp://HOST:PORT nor - (y4m on stdout)")
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            raise ConfigError(f"output: {output!r} has an invalid port") from None
        if not host or port is None or not 0 < port < 65536:
            raise ConfigError(f"output: {output!r} must name a host and a port, e.g. rtp://127.0.0.1:5004")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"output: host {host!r} must be an IP address") from None
        return cls("rtp", host, port)

    def __str__(self) -> str:
        return "-" if self.kind == "y4m" else f"rtp://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class EncoderOptions:
    """libx264 settings of an RTP output: CRF unless a bitrate (bits/s) is given; GOP in frames.

    ``superfast``: at 720p on two cores it encodes in about 15 ms against 25 ms for
    ``veryfast``, for about a fifth more bytes (measured here).
    """

    crf: int = 23
    bitrate: int | None = None
    gop: int | None = None
    preset: str = "superfast"


class _Output:
    """Opens its writer at the first frame (the size is only known then) and writes on one thread."""

    def __init__(
        self,
        target: OutputTarget,
        encoder: EncoderOptions,
        frame_rate: Fraction | None,
        stdout: BinaryIO | None,
    ) -> None:
        self.target = target
        self.encoder = encoder
        self.frame_rate = frame_rate
        self.stdout = stdout
        self.size: tuple[int, int] | None = None
        self.sender: RtpSender | None = None
        self.writer: Y4MWriter | None = None
        self.resized = 0
        self._first: DecodedFrame | None = None  # held until the frame rate is known (y4m only)
        self.closed = False

    def write(self, frame: DecodedFrame) -> None:
        if self.size is None:
            height, width = frame.image.shape[:2]
            self.size = (width - width % 2, height - height % 2)
        frame = self._fit(frame)
        if self.target.kind == "rtp":
            if self.sender is None:
                self.sender = self._open_sender()
            self.sender.send(frame)
            return
        if self.writer is None:
            if self.frame_rate is None and self._first is None:
                self._first = frame  # one frame interval, once: y4m must state its rate up front
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
        """Keep the output size fixed: crop an odd edge, scale a stream that changed resolution."""
        assert self.size is not None
        width, height = self.size
        image = frame.image
        if image.shape[:2] == (height, width):
            return frame
        if image.shape[0] >= height and image.shape[1] >= width and image.shape[0] - height <= 1 and image.shape[1] - width <= 1:
            return frame.with_image(np.ascontiguousarray(image[:height, :width]))
        if self.resized == 0:
            log.warning("input size changed to %dx%d; scaling to the output's %dx%d", image.shape[1], image.shape[0], width, height)
        self.resized += 1
        return frame.with_image(cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA))

    def _open_sender(self) -> RtpSender:
        assert self.size is not None and self.target.host is not None and self.target.port is not None
        width, height = self.size
        return RtpSender(
            self.target.host,
            self.target.port,
            width,
            height,
            self.frame_rate or DEFAULT_FRAME_RATE,
            crf=self.encoder.crf,
            bitrate=self.encoder.bitrate,
            gop=self.encoder.gop,
            preset=self.encoder.preset,
        )

    def _open_writer(self, second: DecodedFrame | None) -> Y4MWriter:
        assert self.size is not None
        rate = self.frame_rate or _rate_between(self._first, second) or DEFAULT_FRAME_RATE
        writer = Y4MWriter(self.stdout or sys.stdout.buffer, *self.size, rate)
        first, self._first = self._first, None
        if first is not None:
            writer.write(first)
        return writer


def _rate_between(first: DecodedFrame | None, second: DecodedFrame | None) -> Fraction | None:
    if first is None or second is None or first.pts is None or second.pts is None or second.pts <= first.pts:
        return None
    seconds = Fraction(second.pts - first.pts) * (second.time_base or RTP_VIDEO_TIME_BASE)
    return (1 / seconds).limit_denominator(1001)


# ---- metrics ---------------------------------------------------------------------


class _ReceiverCollector:
    """Exports the RTP receiver's counters at scrape time (they live in the receiver)."""

    def __init__(self, receiver: RtpReceiver) -> None:
        self.receiver = receiver

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        stats = self.receiver.stats
        for item in fields(stats):
            family = CounterMetricFamily(f"kfgan_pipe_rtp_{item.name}", f"RTP receiver: {item.name.replace('_', ' ')}")
            family.add_metric([], getattr(stats, item.name))
            yield family


class PipeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.added_latency = Histogram(
            "kfgan_pipe_added_latency_seconds",
            "From a frame's arrival (decoded off the socket) to its restored picture being sent",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.frames_sent = Counter("kfgan_pipe_frames_sent_total", "Frames written to the output", registry=registry)
        self.output_errors = Counter(
            "kfgan_pipe_output_errors_total", "Frames the output could not encode or send", registry=registry
        )
        self.silences = Counter(
            "kfgan_pipe_input_silences_total", "Times the RTP sender went quiet past the silence timeout", registry=registry
        )
        self.receiver_state = Gauge(
            "kfgan_pipe_receiver_state", "1 for the RTP receiver's current state", ["state"], registry=registry
        )

    def set_state(self, state: ReceiverState) -> None:
        for candidate in ReceiverState:
            self.receiver_state.labels(candidate.value).set(1 if candidate == state else 0)


# ---- the pipe --------------------------------------------------------------------


@dataclass(slots=True)
class SentFrame:
    """One output frame, for observers such as the live bench."""

    output: StreamOutput
    sent_at: float  # time.monotonic() after the encoder and socket took it

    @property
    def added_latency(self) -> float:
        return self.sent_at - self.output.arrival


@dataclass(slots=True)
class PipeSummary:
    seconds: float
    frames_sent: int
    output_errors: int
    engine: StreamStats
    receiver: RtpReceiverStats
    sender: RtpSenderStats | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_max_ms: float | None
    input_silences: int
    output: str
    output_sdp: Path | None = None
    resized_frames: int = 0
    stage_median_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        engine = self.engine
        latency = (
            f"added latency median {self.latency_p50_ms:.1f} ms, p95 {self.latency_p95_ms:.1f} ms"
            if self.latency_p50_ms is not None and self.latency_p95_ms is not None
            else "no frames"
        )
        rx = self.receiver
        return (
            f"{self.frames_sent} frames to {self.output} in {self.seconds:.1f} s: {engine.restored} restored, "
            f"{engine.skipped} without face/keyframe, {engine.passthrough} passed through, {engine.dropped} dropped "
            f"under load, {engine.errors} errors; {engine.keyframes} keyframes; {latency}; RTP in: "
            f"{rx.packets_received} packets, {rx.packets_lost} lost, {rx.packets_malformed} malformed, "
            f"{rx.decode_errors} decode errors, {self.input_silences} silences"
        )


@dataclass(slots=True)
class _Latencies:
    values: list[float] = field(default_factory=list)

    def quantile_ms(self, q: float) -> float | None:
        return float(np.quantile(self.values, q) * 1000) if self.values else None


async def run_pipe(
    input_sdp: Path | str,
    output: str,
    generator: "BatchGenerator",
    *,
    output_sdp: Path | None = None,
    encoder: EncoderOptions = EncoderOptions(),
    policy: OverloadPolicy = "passthrough",
    engine_settings: EngineSettings | None = None,
    restore_settings: "RestoreSettings | None" = None,
    loss_policy: LossPolicy = "conceal",
    silence_timeout: float = 2.0,
    drain_timeout: float = 1.0,
    duration: float | None = None,
    registry: CollectorRegistry | None = None,
    metrics_port: int | None = None,
    stop: asyncio.Event | None = None,
    stdout: BinaryIO | None = None,
    on_sent: Callable[[SentFrame], None] | None = None,
    on_ready: Callable[[RtpReceiver], None] | None = None,
    handle_signals: bool = True,
) -> PipeSummary:
    """Restore an H.264 RTP stream until stopped (``stop`` set, SIGINT/SIGTERM, or ``duration`` seconds).

    ``input_sdp``: the path of an SDP file (or SDP text) describing the stream to
    receive; we listen on its address and port. ``output``: ``rtp://HOST:PORT``
    or ``-`` for y4m on ``stdout`` (default ``sys.stdout.buffer``).
    ``output_sdp``: where to write the SDP of an RTP output, at start-up
    (parameter sets travel in-band before every IDR). ``engine_settings``
    defaults to an engine deadline of ``PIPE_MAX_LATENCY``. Raises
    :class:`~kfgan_daemon.errors.InputError` (``SdpError``) for an unusable SDP
    or port, :class:`ConfigError` for a bad ``output``. ``on_ready`` is called once
    the socket listens; ``on_sent`` after every output frame.
    """
    target = OutputTarget.parse(output)
    if policy not in OVERLOAD_POLICIES:
        raise ConfigError(f"policy: {policy!r} is not one of {', '.join(OVERLOAD_POLICIES)}")
    if loss_policy not in LOSS_POLICIES:
        raise ConfigError(f"loss-policy: {loss_policy!r} is not one of {', '.join(LOSS_POLICIES)}")
    if target.kind == "y4m" and output_sdp is not None:
        raise ConfigError("output-sdp: only an rtp:// output has an SDP")
    receiver = RtpReceiver.from_sdp(
        str(input_sdp) if isinstance(input_sdp, Path) else input_sdp,
        loss_policy=loss_policy,
        silence_timeout=silence_timeout,
    )
    registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
    metrics = PipeMetrics(registry)
    receiver.on_status = _status_reporter(metrics)
    collector = _ReceiverCollector(receiver)
    registry.register(collector)
    frame_rate = receiver.description.frame_rate
    sink = _Output(target, encoder, frame_rate, stdout)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = _install_signal_handlers(loop, stop) if handle_signals else []
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    engine = StreamEngine(generator, engine_settings or EngineSettings(max_latency=PIPE_MAX_LATENCY), registry=registry)
    write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfgan-pipe-out")
    latencies = _Latencies()
    sent = {"frames": 0, "errors": 0}
    started = time.monotonic()
    try:
        await receiver.start()
        if output_sdp is not None:
            _write_output_sdp(output_sdp, target, frame_rate)
        await engine.start()
        stream = engine.open_stream(STREAM_ID, policy=policy, realtime=True, restore_settings=restore_settings)
        metrics.set_state(receiver.state)
        if on_ready is not None:
            on_ready(receiver)
        log.info("pipe: %s:%d -> %s", receiver.host, receiver.port, target)

        async def pump() -> None:
            async for frame in receiver:
                await stream.submit(frame, arrival=time.monotonic())

        async def send() -> None:
            async for out in stream.results():
                try:
                    await loop.run_in_executor(write_thread, sink.write, out.frame)
                except OutputError as exc:
                    sent["errors"] += 1
                    metrics.output_errors.inc()
                    if target.kind == "y4m":
                        log.error("pipe: %s; stopping", exc)
                        stop.set()
                        return
                    log.warning("pipe: %s", exc)
                    continue
                now = time.monotonic()
                sent["frames"] += 1
                metrics.frames_sent.inc()
                record = SentFrame(out, now)
                latencies.values.append(record.added_latency)
                metrics.added_latency.observe(record.added_latency)
                if on_sent is not None:
                    on_sent(record)

        pump_task = asyncio.create_task(pump(), name="kfgan-pipe-receive")
        send_task = asyncio.create_task(send(), name="kfgan-pipe-send")
        waits = [asyncio.create_task(stop.wait()), pump_task, send_task]
        await asyncio.wait(waits, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
        log.info("pipe: stopping")
        pump_task.cancel()
        await asyncio.gather(pump_task, return_exceptions=True)
        await receiver.close()
        await stream.close(drain=True, timeout=drain_timeout)
        await send_task
        waits[0].cancel()
        await loop.run_in_executor(write_thread, sink.close)
    finally:
        await receiver.close()
        await engine.stop(drain=False)
        if not sink.closed:
            try:
                await loop.run_in_executor(write_thread, sink.close)
            except OutputError as exc:
                log.warning("pipe: closing the output: %s", exc)
        write_thread.shutdown(wait=True)
        registry.unregister(collector)
        for sig in installed:
            loop.remove_signal_handler(sig)
    return PipeSummary(
        seconds=time.monotonic() - started,
        frames_sent=sent["frames"],
        output_errors=sent["errors"],
        engine=stream.stats,
        receiver=receiver.stats,
        sender=sink.sender.stats if sink.sender is not None else None,
        latency_p50_ms=latencies.quantile_ms(0.5),
        latency_p95_ms=latencies.quantile_ms(0.95),
        latency_max_ms=latencies.quantile_ms(1.0),
        input_silences=receiver.stats.silences,
        output=str(target),
        output_sdp=output_sdp,
        resized_frames=sink.resized,
        stage_median_ms=stream.stage_ms(),
    )


def _status_reporter(metrics: PipeMetrics) -> Callable[[ReceiverStatus], None]:
    def report(status: ReceiverStatus) -> None:
        metrics.set_state(status.state)
        if status.state == ReceiverState.SILENT:
            metrics.silences.inc()
            log.warning("pipe: input silent (%s); waiting for the sender to come back", status.detail)
        elif status.state == ReceiverState.RECEIVING:
            log.info("pipe: receiving (%s)", status.detail)

    return report


def _write_output_sdp(path: Path, target: OutputTarget, frame_rate: Fraction | None) -> None:
    assert target.host is not None and target.port is not None
    description = H264SessionDescription(
        address=target.host, port=target.port, frame_rate=frame_rate, session_name="kfgan-daemon restored"
    )
    try:
        path.write_text(description.to_sdp(), encoding="ascii")
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the output SDP ({exc.strerror or exc})") from exc


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[int]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)
    return installed
