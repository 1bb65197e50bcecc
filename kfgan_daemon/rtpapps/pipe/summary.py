"""What the pipe reports: each frame it sent (for observers such as the live bench) and a closing summary."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kfgan_daemon.engine.stream import StreamOutput, StreamStats
from kfgan_daemon.media.rtp import RtpReceiverStats, RtpSenderStats


@dataclass(slots=True)
class SentFrame:
    """One output frame and when it left: ``time.monotonic()`` after the encoder and socket took it."""

    output: StreamOutput
    sent_at: float

    @property
    def added_latency(self) -> float:
        """From the arrival of the frame's last packet to its output being sent."""
        return self.sent_at - self.output.arrival


@dataclass(slots=True)
class LatencyLog:
    """Added latencies of the frames sent, in seconds."""

    values: list[float] = field(default_factory=list)

    def quantile_ms(self, q: float) -> float | None:
        return float(np.quantile(self.values, q) * 1000) if self.values else None


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
            f"{engine.carried_forward} carried forward, {engine.no_face} without a face, {engine.no_keyframe} "
            f"before a usable keyframe, {engine.shed} shed under load (sent unrestored), {engine.dropped} dropped "
            f"under load, {engine.errors} errors; {engine.keyframes} keyframes; {latency}; RTP in: "
            f"{rx.packets_received} packets, {rx.packets_lost} lost, {rx.packets_malformed} malformed, "
            f"{rx.decode_errors} decode errors, {self.input_silences} silences"
        )
