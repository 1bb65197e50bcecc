"""Prometheus metrics of the streaming engine, on a registry the caller may inject."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

STAGES = (
    "start", "prepare", "locate", "observe_keyframe", "inference", "complete", "carry_forward", "remember", "pass_through",
    "total",
)
OUTCOMES = ("restored", "carried_forward", "no_face", "no_keyframe", "shed", "dropped", "error")
QUEUES = ("inbox", "pending", "outbox")


class EngineMetrics:
    """Every engine metric, labelled per stream (and per device for the inference worker).

    ``registry`` defaults to a private one so that several engines (and tests)
    never collide; the service passes the registry it serves on ``/metrics``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.stage_seconds = Histogram(
            "kfgan_engine_stage_seconds",
            "Per-frame time of each engine stage; 'total' is the latency the engine adds to a frame",
            ["stream", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames_received = Counter(
            "kfgan_engine_frames_received_total", "Frames submitted to a stream", ["stream"], registry=r
        )
        self.frames = Counter(
            "kfgan_engine_frames_total",
            "Frames by outcome: restored; carried_forward (too late to restore: the last restored correction, "
            "moved with the face); no_face; no_keyframe (nothing to restore from yet); shed (too late to restore, "
            "nothing to carry: sent unrestored); dropped (overload with policy drop: not sent); error (sent unrestored)",
            ["stream", "outcome"],
            registry=r,
        )
        self.keyframes = Counter(
            "kfgan_engine_keyframes_total", "I-frames seen (all reach the keyframe store)", ["stream"], registry=r
        )
        self.deadline_misses = Counter(
            "kfgan_engine_deadline_misses_total",
            "Frames that could not be restored before the real-time deadline (carried forward, shed or dropped)",
            ["stream"],
            registry=r,
        )
        self.output_overflow = Counter(
            "kfgan_engine_output_overflow_total",
            "Finished frames discarded because the stream's consumer did not read them in time",
            ["stream"],
            registry=r,
        )
        self.errors = Counter(
            "kfgan_engine_errors_total", "Exceptions caught per stage; the frame was passed through", ["stream", "stage"], registry=r
        )
        self.queue_depth = Gauge("kfgan_engine_queue_depth", "Items waiting in a stream's queues", ["stream", "queue"], registry=r)
        self.fps = Gauge("kfgan_engine_stream_fps", "Frames per second leaving a stream, over the last second", ["stream"], registry=r)
        self.streams_open = Gauge("kfgan_engine_streams_open", "Streams currently open", registry=r)
        self.batch_size = Histogram(
            "kfgan_engine_batch_size", "Face jobs per generator batch", ["device"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_streams = Histogram(
            "kfgan_engine_batch_streams", "Distinct streams per generator batch", ["device"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "kfgan_engine_batch_seconds", "Generator time per batch", ["device"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference_queue = Gauge(
            "kfgan_engine_inference_queue_depth", "Face jobs waiting for the generator", ["device"], registry=r
        )
        self.inference_expired = Counter(
            "kfgan_engine_inference_expired_total",
            "Face jobs skipped by the inference worker because their frame's deadline had passed",
            ["device"],
            registry=r,
        )
        self.inference_errors = Counter(
            "kfgan_engine_inference_errors_total", "Generator calls that raised", ["device"], registry=r
        )
        self.inference_restarts = Counter(
            "kfgan_engine_inference_restarts_total",
            "Times the inference worker ended unexpectedly and was restarted",
            ["device"],
            registry=r,
        )
        self.inference_up = Gauge(
            "kfgan_engine_inference_up", "1 while the inference worker runs, 0 while it is down or restarting",
            ["device"], registry=r,
        )
        self.receive_backlog = Gauge(
            "kfgan_engine_receive_backlog_frames",
            "Decoded frames received from a transport and not yet taken by the stream (bounded; newest wins)",
            ["stream"],
            registry=r,
        )
        self.restored_share = Gauge(
            "kfgan_engine_planned_restored_share",
            "Share of a live stream's frames the plan restores (1: every frame); the others carry the last correction",
            ["stream"],
            registry=r,
        )
        self.plan_rate = Gauge(
            "kfgan_engine_planned_restorations_per_second", "Crops per second planned over all live streams", registry=r
        )
        self.receive_dropped = Counter(
            "kfgan_engine_receive_dropped_total",
            "Received frames discarded before the stream took them because newer ones arrived (never I-frames)",
            ["stream"],
            registry=r,
        )

    def forget_stream(self, stream_id: str) -> None:
        """Drop a closed stream's series so that label cardinality follows the open streams."""
        self._remove(self.frames_received, (stream_id,))
        self._remove(self.keyframes, (stream_id,))
        self._remove(self.deadline_misses, (stream_id,))
        self._remove(self.output_overflow, (stream_id,))
        self._remove(self.fps, (stream_id,))
        self._remove(self.receive_backlog, (stream_id,))
        self._remove(self.receive_dropped, (stream_id,))
        self._remove(self.restored_share, (stream_id,))
        for stage in STAGES:
            self._remove(self.stage_seconds, (stream_id, stage))
            self._remove(self.errors, (stream_id, stage))
        for outcome in OUTCOMES:
            self._remove(self.frames, (stream_id, outcome))
        for queue in QUEUES:
            self._remove(self.queue_depth, (stream_id, queue))

    @staticmethod
    def _remove(metric, labels: tuple[str, ...]) -> None:
        try:
            metric.remove(*labels)
        except KeyError:
            pass
