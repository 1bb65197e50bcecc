"""``kfgan-daemon pipe``: H.264 RTP in (an SDP file), restored video out as H.264 RTP or y4m on stdout.

    receiver (UDP socket, decode at the marker bit) -> engine stream (real time) -> RTP sender / y4m writer

The receiver waits for a keyframe at start-up, conceals or waits out packet
loss, and reports a sender that went silent (and its return); the engine keeps
the added latency bounded; the output writer runs on its own thread. SIGINT
and SIGTERM stop the pipe cleanly: frames already decoded still go out (for up
to ``drain_timeout``), the encoder is flushed, sockets are closed.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from prometheus_client import CollectorRegistry

from kfgan_daemon.engine.engine import StreamEngine
from kfgan_daemon.engine.heap import CollectorControl
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import LiveStream
from kfgan_daemon.errors import ConfigError, OutputError
from kfgan_daemon.media.rtp import RtpReceiver
from kfgan_daemon.media.rtp.decoder import LossPolicy
from kfgan_daemon.rtpapps.pipe.metrics import PipeMetrics, ReceiverCollector
from kfgan_daemon.rtpapps.pipe.summary import LatencyLog, PipeSummary, SentFrame
from kfgan_daemon.rtpapps.pipe.target import OutputTarget, write_output_sdp
from kfgan_daemon.rtpapps.pipe.writer import EncoderOptions, LazyWriter

if TYPE_CHECKING:
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

STREAM_ID = "pipe"
# The engine's share of the latency from last packet in to packet out (decoding and
# re-encoding add 10-30 ms at 720p on a small CPU). One restoration takes 60-90 ms on a
# 2-core machine busy with a second 720p stream: at 80 ms the plan restored 20% of two
# such streams' frames, at 120 ms 27%, with a p95 added latency of 140-150 ms.
PIPE_MAX_LATENCY = 0.12
LOSS_POLICIES = ("conceal", "wait_keyframe")


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
    engine: StreamEngine | None = None,
    stream_id: str = STREAM_ID,
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
    the socket listens; ``on_sent`` after every output frame. ``engine``: a started
    engine to open the stream ``stream_id`` in, shared with other pipes (their
    faces batched together); the caller warms and stops it. By default the pipe
    runs an engine of its own.
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
    receiver.on_status = metrics.status_reporter()
    receiver_collector = ReceiverCollector(receiver)
    registry.register(receiver_collector)
    frame_rate = receiver.description.frame_rate
    sink = LazyWriter(target, encoder, frame_rate, stdout)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = _install_signal_handlers(loop, stop) if handle_signals else []
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr="127.0.0.1", registry=registry)
    own_engine = engine is None
    if engine is None:
        engine = StreamEngine(
            generator, engine_settings or EngineSettings(max_latency=PIPE_MAX_LATENCY), registry=registry
        )
    write_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfgan-pipe-out")
    latencies = LatencyLog()
    sent = {"frames": 0, "errors": 0}
    started = time.monotonic()
    stream: LiveStream | None = None
    # A shared engine's owner runs the process and decides about its collector.
    gc_control = CollectorControl(registry) if own_engine else None
    try:
        if own_engine:
            await engine.start()
            await engine.warm_up(restore_settings)  # before packets flow: loading dlib models stalls every thread
        await receiver.start()
        if output_sdp is not None:
            write_output_sdp(output_sdp, target, frame_rate)
        stream = engine.open_stream(stream_id, policy=policy, realtime=True, restore_settings=restore_settings)
        if gc_control is not None:
            gc_control.freeze()
        metrics.set_state(receiver.state)
        if on_ready is not None:
            on_ready(receiver)
        log.info("pipe: %s:%d -> %s", receiver.host, receiver.port, target)

        async def pump() -> None:
            async for frame in receiver:
                await stream.submit(frame)  # the deadline counts from frame.arrival, its last packet

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
                sent["frames"] += 1
                metrics.frames_sent.inc()
                record = SentFrame(out, time.monotonic())
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
        if own_engine:
            await engine.stop(drain=False)
        elif stream is not None:
            await stream.close(drain=False)  # a shared engine goes on: leave no stream of ours in it
        if not sink.closed:
            try:
                await loop.run_in_executor(write_thread, sink.close)
            except OutputError as exc:
                log.warning("pipe: closing the output: %s", exc)
        write_thread.shutdown(wait=True)
        registry.unregister(receiver_collector)
        if gc_control is not None:
            gc_control.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    assert stream is not None
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


def _install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> list[int]:
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # not the main thread, or no signals on this platform
        installed.append(sig)
    return installed
