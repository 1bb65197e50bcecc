"""``kfgan-daemon pipe``: H.264 RTP in (an SDP file), restored video out as H.264 RTP or y4m on stdout.

    receiver (UDP socket, decode at the marker bit) -> engine stream (real time) -> RTP sender / y4m writer

:class:`RtpPipe` is one such stream through a stream of an engine it is
given: ``pipe`` runs one in a process of its own (:func:`run_pipe`, on
:class:`~kfgan_daemon.process.DaemonProcess`), the live bench several on one
engine, the Janus attachment one per publisher. The receiver waits for a
keyframe at start-up, conceals or waits out packet loss, and reports a sender
that went silent (and its return); the engine keeps the added latency bounded;
the output writer runs on its own thread. On a stop, frames already decoded
still go out (for up to ``drain_timeout``), the encoder is flushed, sockets are
closed.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from prometheus_client import CollectorRegistry

from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import LiveStream
from kfgan_daemon.errors import ConfigError, OutputError
from kfgan_daemon.media.rtp import RtpReceiver
from kfgan_daemon.media.x264 import EncodeOptions
from kfgan_daemon.media.rtp.decoder import LOSS_POLICIES, LossPolicy
from kfgan_daemon.media.rtp.sdp import H264SessionDescription
from kfgan_daemon.process import DaemonProcess, Runtime
from kfgan_daemon.rtpapps.pipe.metrics import PipeMetrics, ReceiverCollector
from kfgan_daemon.rtpapps.pipe.summary import LatencyLog, PipeSummary, SentFrame
from kfgan_daemon.rtpapps.pipe.target import OutputTarget, write_output_sdp
from kfgan_daemon.rtpapps.pipe.writer import PIPE_ENCODE, LazyWriter

if TYPE_CHECKING:
    from kfgan_daemon.engine.engine import StreamEngine
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

STREAM_ID = "pipe"
# The engine's share of the latency from last packet in to packet out (decoding and
# re-encoding add 10-30 ms at 720p on a small CPU). One restoration takes 60-90 ms on a
# 2-core machine busy with a second 720p stream: at 80 ms the plan restored 20% of two
# such streams' frames, at 120 ms 27%, with a p95 added latency of 140-150 ms.
PIPE_MAX_LATENCY = 0.12


@dataclass(frozen=True, slots=True)
class PipeHooks:
    """What an owner of a pipe observes: the socket listening, each frame sent, the store's wish for an
    I-frame (checked after every frame; the owner asks the sender for one, at its own pace)."""

    on_ready: Callable[[RtpReceiver], None] | None = None
    on_sent: Callable[[SentFrame], None] | None = None
    on_keyframe_needed: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class PipeOptions:
    """How a pipe receives and sends; the command line's options of ``pipe``."""

    output_sdp: Path | None = None
    encoder: EncodeOptions = PIPE_ENCODE
    policy: OverloadPolicy = "passthrough"
    loss_policy: LossPolicy = "conceal"
    silence_timeout: float = 2.0
    drain_timeout: float = 1.0
    # An RTP output's SSRC (random when None; a Janus remote publisher wants its own) and H.264 profile
    # ("baseline": what every subscriber of a conference decodes; None: libx264's choice)
    output_ssrc: int | None = None
    output_profile: str | None = None


class RtpPipe:
    """One H.264 RTP stream restored through a stream of an engine: ``open``, ``run``, ``finish``, ``close``.

    ``input_sdp``: the path of an SDP file, SDP text, or a parsed description of
    the stream to receive; we listen on its address and port (0: any free one,
    ``receiver.port`` once open). ``output``: ``rtp://HOST:PORT``
    or ``-`` for y4m on ``stdout`` (default ``sys.stdout.buffer``). Raises
    :class:`~kfgan_daemon.errors.InputError` (``SdpError``) for an unusable SDP,
    :class:`ConfigError` for a bad ``output`` or option, before anything opens.
    """

    def __init__(
        self,
        input_sdp: Path | str | H264SessionDescription,
        output: str,
        options: PipeOptions = PipeOptions(),
        *,
        stream_id: str = STREAM_ID,
        restore_settings: "RestoreSettings | None" = None,
        registry: CollectorRegistry | None = None,
        stdout: BinaryIO | None = None,
        hooks: PipeHooks = PipeHooks(),
    ) -> None:
        self.target = OutputTarget.parse(output)
        if options.policy not in OVERLOAD_POLICIES:
            raise ConfigError(f"policy: {options.policy!r} is not one of {', '.join(OVERLOAD_POLICIES)}")
        if options.loss_policy not in LOSS_POLICIES:
            raise ConfigError(f"loss-policy: {options.loss_policy!r} is not one of {', '.join(LOSS_POLICIES)}")
        if self.target.kind == "y4m" and options.output_sdp is not None:
            raise ConfigError("output-sdp: only an rtp:// output has an SDP")
        self.options = options
        self.stream_id = stream_id
        self.restore_settings = restore_settings
        self.hooks = hooks
        receiving = {"loss_policy": options.loss_policy, "silence_timeout": options.silence_timeout}
        if isinstance(input_sdp, H264SessionDescription):
            self.receiver = RtpReceiver(input_sdp, **receiving)
        else:
            self.receiver = RtpReceiver.from_sdp(str(input_sdp) if isinstance(input_sdp, Path) else input_sdp, **receiving)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.metrics = PipeMetrics(self.registry)
        self.receiver.on_status = self.metrics.status_reporter()
        self._receiver_collector = ReceiverCollector(self.receiver)
        self.registry.register(self._receiver_collector)
        self.sink = LazyWriter(
            self.target, options.encoder, self.receiver.description.frame_rate, stdout,
            ssrc=options.output_ssrc, profile=options.output_profile,
        )
        self.stream: LiveStream | None = None
        self._write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfgan-pipe-out")
        self._latencies = LatencyLog()
        self._frames_sent = 0
        self._output_errors = 0
        self._started = time.monotonic()
        self._pump: asyncio.Task[None] | None = None
        self._send: asyncio.Task[None] | None = None
        self._finishing: asyncio.Future[None] | None = None
        self._closed = False

    async def open(self, engine: "StreamEngine") -> None:
        """Listen, write the output SDP, open the engine stream; ``hooks.on_ready`` once listening."""
        await self.receiver.start()
        if self.options.output_sdp is not None:
            write_output_sdp(self.options.output_sdp, self.target, self.receiver.description.frame_rate)
        self.stream = engine.open_stream(
            self.stream_id, policy=self.options.policy, realtime=True, restore_settings=self.restore_settings
        )
        self.metrics.set_state(self.receiver.state)
        self._started = time.monotonic()
        if self.hooks.on_ready is not None:
            self.hooks.on_ready(self.receiver)
        log.info("pipe %s: %s:%d -> %s", self.stream_id, self.receiver.host, self.receiver.port, self.target)

    async def run(self) -> None:
        """Receive, restore and send until the input ends, the output fails or :meth:`finish` is called."""
        if self.stream is None:
            raise RuntimeError("open the pipe before running it")
        self._pump = asyncio.create_task(self._receive(self.stream), name=f"kfgan-pipe-receive-{self.stream_id}")
        self._send = asyncio.create_task(self._deliver(self.stream), name=f"kfgan-pipe-send-{self.stream_id}")
        await asyncio.wait({self._pump, self._send}, return_when=asyncio.FIRST_COMPLETED)
        await self.finish()

    async def finish(self) -> None:
        """Stop receiving, let the frames already decoded out (up to ``drain_timeout``), flush the encoder.
        Once, however many callers ask (a stop request and the input's end can come together)."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._finish())
        await asyncio.shield(self._finishing)

    async def _finish(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self.receiver.close()
        if self.stream is not None:
            await self.stream.close(drain=True, timeout=self.options.drain_timeout)
        if self._send is not None:
            await self._send
        await self._close_sink()

    async def close(self) -> None:
        """Release everything, whatever state the pipe is in; a shared engine goes on without our stream."""
        if self._closed:
            return
        self._closed = True
        await self.receiver.close()
        if self.stream is not None:
            await self.stream.close(drain=False)
        if self._send is not None and not self._send.done():
            self._send.cancel()
            await asyncio.gather(self._send, return_exceptions=True)
        await self._close_sink()
        self._write_thread.shutdown(wait=True)
        self.registry.unregister(self._receiver_collector)

    @property
    def frames_sent(self) -> int:
        """Frames the output has sent so far."""
        return self._frames_sent

    def request_output_keyframe(self) -> None:
        """Make the next frame sent an IDR: a receiver of the output asked for one."""
        self.sink.request_keyframe()

    def summary(self) -> PipeSummary:
        if self.stream is None:
            raise RuntimeError("the pipe never opened")
        return PipeSummary(
            seconds=time.monotonic() - self._started,
            frames_sent=self._frames_sent,
            output_errors=self._output_errors,
            engine=self.stream.stats,
            receiver=self.receiver.stats,
            sender=self.sink.sender.stats if self.sink.sender is not None else None,
            latency_p50_ms=self._latencies.quantile_ms(0.5),
            latency_p95_ms=self._latencies.quantile_ms(0.95),
            latency_max_ms=self._latencies.quantile_ms(1.0),
            input_silences=self.receiver.stats.silences,
            output=str(self.target),
            output_sdp=self.options.output_sdp,
            resized_frames=self.sink.resized,
            stage_median_ms=self.stream.stage_ms(),
        )

    async def _receive(self, stream: LiveStream) -> None:
        async for frame in self.receiver:
            await stream.submit(frame)  # the deadline counts from frame.arrival, its last packet
            if self.hooks.on_keyframe_needed is not None and stream.needs_keyframe:
                self.hooks.on_keyframe_needed()

    async def _deliver(self, stream: LiveStream) -> None:
        loop = asyncio.get_running_loop()
        async for out in stream.results():
            try:
                await loop.run_in_executor(self._write_thread, self.sink.write, out.frame)
            except OutputError as exc:
                self._output_errors += 1
                self.metrics.output_errors.inc()
                if self.target.kind == "y4m":
                    log.error("pipe %s: %s; stopping", self.stream_id, exc)
                    return  # the reader went away: the pipe's work is over
                log.warning("pipe %s: %s", self.stream_id, exc)
                continue
            self._frames_sent += 1
            self.metrics.frames_sent.inc()
            record = SentFrame(out, time.monotonic())
            self._latencies.values.append(record.added_latency)
            self.metrics.added_latency.observe(record.added_latency)
            if self.hooks.on_sent is not None:
                self.hooks.on_sent(record)

    async def _close_sink(self) -> None:
        if self.sink.closed:
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._write_thread, self.sink.close)
        except OutputError as exc:
            log.warning("pipe %s: closing the output: %s", self.stream_id, exc)


class PipeMode:
    """``kfgan-daemon pipe`` as a mode of :class:`~kfgan_daemon.process.DaemonProcess`: one pipe, its
    Prometheus endpoint if asked for."""

    name = "pipe"

    def __init__(self, pipe: RtpPipe, metrics_port: int | None = None) -> None:
        self.pipe = pipe
        self.metrics_port = metrics_port

    async def prepare(self) -> None:
        if self.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(self.metrics_port, addr="127.0.0.1", registry=self.pipe.registry)

    async def start(self, runtime: Runtime) -> None:
        await self.pipe.open(runtime.engine)

    async def run(self) -> None:
        await self.pipe.run()

    async def drain(self) -> None:
        await self.pipe.finish()

    async def close(self) -> None:
        await self.pipe.close()

    def ready_status(self) -> str:
        return f"restoring {self.pipe.receiver.host}:{self.pipe.receiver.port} -> {self.pipe.target}"


async def run_pipe(
    input_sdp: Path | str,
    output: str,
    generator: "BatchGenerator",
    options: PipeOptions = PipeOptions(),
    *,
    engine_settings: EngineSettings | None = None,
    restore_settings: "RestoreSettings | None" = None,
    duration: float | None = None,
    registry: CollectorRegistry | None = None,
    metrics_port: int | None = None,
    stop: asyncio.Event | None = None,
    stdout: BinaryIO | None = None,
    hooks: PipeHooks = PipeHooks(),
    handle_signals: bool = True,
) -> PipeSummary:
    """Restore an H.264 RTP stream in a process of its own until stopped (``stop`` set, SIGINT/SIGTERM,
    the y4m reader gone, or ``duration`` seconds), and summarise it.

    ``engine_settings`` defaults to an engine deadline of ``PIPE_MAX_LATENCY``.
    Raises what :class:`RtpPipe` raises, before anything starts.
    """
    pipe = RtpPipe(
        input_sdp, output, options, restore_settings=restore_settings, registry=registry, stdout=stdout, hooks=hooks
    )
    process = DaemonProcess(
        PipeMode(pipe, metrics_port),
        generator,
        engine_settings=engine_settings or EngineSettings(max_latency=PIPE_MAX_LATENCY),
        restore_settings=restore_settings,
        registry=pipe.registry,
        handle_signals=handle_signals,
        stop=stop,
        duration=duration,
    )
    await process.serve()
    return pipe.summary()
