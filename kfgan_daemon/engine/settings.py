"""Engine tuning knobs (plain data; the service validates its own config and maps it here)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

from kfgan_daemon.errors import ConfigError

OverloadPolicy = Literal["passthrough", "drop"]
OVERLOAD_POLICIES: tuple[str, ...] = get_args(OverloadPolicy)


def _default_cpu_workers() -> int:
    return max(2, min(4, os.cpu_count() or 2))


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the engine batches, queues and sheds work.

    Latency in a real-time stream is bounded by ``max_latency``, counted from
    the frame's arrival (its last packet): a frame whose restoration cannot
    finish by then is sent with the last restored correction carried forward,
    else unrestored, with policy ``passthrough``, or dropped with ``drop``.

    Which frames are restored is planned (``engine.planner``): the engine keeps
    ``target_busy`` of the usable cores busy, shares the restorations fairly
    among the streams and replans every ``plan_interval`` seconds. Its capacity
    is the number of streams that fit with at least ``min_restored_share`` of
    their frames restored; before any stream has run it is estimated for a
    ``capacity_reference`` stream (width, height, frames per second).
    """

    max_batch: int = 4
    max_batch_wait: float = 0.005
    max_latency: float = 0.1
    max_in_flight: int = 3
    inbox_size: int = 8
    outbox_size: int = 8
    inference_queue_size: int = 64
    cpu_workers: int = 0
    max_streams: int | None = None
    # Intra-op threads of a CPU generator. The engine already runs face, inference and
    # codec work on separate threads at once; an OpenMP pool as wide as the machine
    # then spins against them (seen here: 1 thread 30 ms, 2 threads 1 s per crop on a
    # busy 2-core machine). None leaves torch's setting alone.
    inference_threads: int | None = 1
    # A frame not restored gets the last restored correction at the alignment of the last frame
    # whose face was followed, if that frame is at most this many frames older, instead of
    # following its own face first (7-13 ms of a face thread at 720p, time the next restorable
    # frame needs). Measured on the 7 held-out clips (bench --carry-forward, CRF 42, every 2nd to
    # 5th frame restored): unfollowed carries keep -0.002 to +0.03 dB more face PSNR and 1-2% less
    # flicker than following every face; 0 follows every such frame's face when there is time.
    unfollowed_carry_frames: int = 4
    target_busy: float = 0.85
    min_restored_share: float = 0.2
    plan_interval: float = 0.5
    capacity_reference: tuple[int, int, float] = (640, 480, 30.0)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError("max_batch: must be at least 1")
        if self.max_batch_wait < 0:
            raise ConfigError("max_batch_wait: must not be negative")
        if self.max_latency <= 0:
            raise ConfigError("max_latency: must be positive")
        for name in ("max_in_flight", "inbox_size", "outbox_size", "inference_queue_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be at least 1")
        if self.cpu_workers < 0:
            raise ConfigError("cpu_workers: must not be negative (0 picks one from the core count)")
        if self.max_streams is not None and self.max_streams < 1:
            raise ConfigError("max_streams: must be at least 1")
        if self.unfollowed_carry_frames < 0:
            raise ConfigError("unfollowed_carry_frames: must not be negative")
        if self.inference_threads is not None and self.inference_threads < 1:
            raise ConfigError("inference_threads: must be at least 1 (or None to leave torch alone)")
        if not 0 < self.target_busy <= 1:
            raise ConfigError("target_busy: must be in (0, 1]")
        if not 0 < self.min_restored_share <= 1:
            raise ConfigError("min_restored_share: must be in (0, 1]")
        if self.plan_interval <= 0:
            raise ConfigError("plan_interval: must be positive")
        width, height, fps = self.capacity_reference
        if width < 1 or height < 1 or fps <= 0:
            raise ConfigError("capacity_reference: must be (width, height, frames per second), all positive")

    @property
    def cpu_threads(self) -> int:
        return self.cpu_workers or _default_cpu_workers()
