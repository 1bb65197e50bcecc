"""Prometheus metrics of the control plane; the engine registers its own on the same registry."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector


class ServiceMetrics:
    """HTTP, WebRTC session and lifecycle metrics on one registry served at ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter(
            "kfgan_http_requests_total", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.request_errors = Counter(
            "kfgan_http_request_errors_total",
            "Rejected or failed HTTP requests by reason (bad_json, bad_sdp, no_video, unauthorized, too_large, "
            "capacity, not_ready, draining, not_found, internal, ...)",
            ["route", "reason"],
            registry=r,
        )
        self.offers = Counter(
            "kfgan_webrtc_offers_total", "WebRTC offers by result (answered or rejected)", ["result"], registry=r
        )
        self.sessions = Gauge("kfgan_webrtc_sessions", "Live WebRTC peer connections", registry=r)
        self.pli_sent = Counter(
            "kfgan_webrtc_pli_sent_total", "RTCP PLIs sent to ask a sender for a keyframe", registry=r
        )
        self.ready = Gauge("kfgan_ready", "1 when the model is loaded and warm and the daemon takes offers", registry=r)
        self.model = Info("kfgan_model", "The generator being served", registry=r)
        self.instance = Info(
            "kfgan_instance", "This daemon's instance_id, the prefix of its session ids and its balancer server name",
            registry=r,
        )
        self.virtual_camera_frames = Counter(
            "kfgan_virtual_camera_frames_total", "Frames written to the virtual camera", registry=r
        )
        self.virtual_camera_skipped = Counter(
            "kfgan_virtual_camera_skipped_total", "Frames not written because the camera was still busy", registry=r
        )
        self.heap_release_collect = Histogram(
            "kfgan_heap_release_collect_seconds",
            "Garbage collection run after calls end, before free heap is returned to the OS (it holds the GIL)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
