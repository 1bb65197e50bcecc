"""Prometheus metrics of the pipe: its output, and the RTP receiver's counters exported at scrape time."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from kfgan_daemon.engine.metrics import LATENCY_BUCKETS
from kfgan_daemon.media.rtp import ReceiverState, ReceiverStatus, RtpReceiver

log = logging.getLogger(__name__)


class ReceiverCollector:
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
            "From the arrival of a frame's last RTP packet to its output picture being sent",
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

    def status_reporter(self) -> Callable[[ReceiverStatus], None]:
        """A receiver ``on_status`` callback that keeps the state gauge and logs silences and returns."""

        def report(status: ReceiverStatus) -> None:
            self.set_state(status.state)
            if status.state == ReceiverState.SILENT:
                self.silences.inc()
                log.warning("pipe: input silent (%s); waiting for the sender to come back", status.detail)
            elif status.state == ReceiverState.RECEIVING:
                log.info("pipe: receiving (%s)", status.detail)

        return report
