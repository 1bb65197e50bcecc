"""One stream's counts (engine/counts.py): each event taken once, and the stats, metrics and snapshots agree."""
from __future__ import annotations

import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from engine_support import make_frame
from kfgan_daemon.engine.counts import StageHistory, StreamCounts
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.output import Outcome, StreamOutput

pytestmark = pytest.mark.timeout(60)


class PlanSpy:
    """Stands in for the CadencePlanner: records the CPU seconds it is told of."""

    rate = 12.5

    def __init__(self) -> None:
        self.cpu: list[tuple[str, str, float]] = []

    def observe_stage(self, stream_id: str, stage: str, cpu_seconds: float) -> None:
        self.cpu.append((stream_id, stage, cpu_seconds))

    def share(self, stream_id: str) -> float:
        return 0.5


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"stream": "s", **labels}) or 0.0


def test_every_event_reaches_the_stats_and_the_metrics_alike() -> None:
    registry = CollectorRegistry()
    counts = StreamCounts("s", EngineMetrics(registry))
    counts.received(keyframe=True)
    counts.received(keyframe=False)
    arrival = time.monotonic() - 0.02
    for outcome in (Outcome.RESTORED, Outcome.CARRIED_FORWARD, Outcome.NO_FACE, Outcome.SHED, Outcome.ERROR):
        output = StreamOutput(make_frame(0), outcome, arrival)
        counts.emitted(output)
        assert output.latency >= 0.02  # emitted is stamped
    counts.error("complete")  # the ERROR output above was counted where its exception was caught
    counts.dropped()
    counts.deadline_missed()
    counts.overflowed()

    stats = counts.snapshot()
    assert (stats.received, stats.keyframes, stats.emitted) == (2, 1, 5)
    assert (stats.restored, stats.carried_forward, stats.no_face, stats.no_keyframe, stats.shed) == (1, 1, 1, 0, 1)
    assert (stats.errors, stats.dropped, stats.deadline_misses, stats.output_overflow) == (1, 1, 1, 1)
    assert sample(registry, "kfgan_engine_frames_received_total") == stats.received
    assert sample(registry, "kfgan_engine_keyframes_total") == stats.keyframes
    for outcome in ("restored", "carried_forward", "no_face", "no_keyframe", "shed", "dropped"):
        assert sample(registry, "kfgan_engine_frames_total", outcome=outcome) == getattr(stats, outcome)
    assert sample(registry, "kfgan_engine_errors_total", stage="complete") == stats.errors
    assert sample(registry, "kfgan_engine_deadline_misses_total") == stats.deadline_misses
    assert sample(registry, "kfgan_engine_output_overflow_total") == stats.output_overflow
    assert sample(registry, "kfgan_engine_stage_seconds_count", stage="total") == stats.emitted
    assert counts.fps == 5.0
    p50, = counts.latency_quantiles(0.5)
    assert p50 is not None and p50 >= 0.02 and counts.stage_ms()["total"] >= 20


def test_a_stage_time_feeds_the_metrics_the_medians_the_estimate_and_the_plan() -> None:
    registry = CollectorRegistry()
    plan = PlanSpy()
    counts = StreamCounts("s", EngineMetrics(registry), plan)  # type: ignore[arg-type]
    for seconds in (0.010, 0.030, 0.020):
        counts.stage("prepare", seconds, cpu_seconds=seconds / 2)
    counts.stage("inference", 0.050)  # no CPU time measured: the plan is not told
    assert counts.stage_ms() == pytest.approx({"prepare": 20.0, "inference": 50.0})
    assert counts.expected("prepare", time.monotonic()) == pytest.approx(0.020)
    assert counts.expected("locate", time.monotonic()) == 0.0  # never measured: unknown
    assert [stage for _, stage, _ in plan.cpu] == ["prepare"] * 3
    assert sample(registry, "kfgan_engine_stage_seconds_count", stage="prepare") == 3
    counts.emitted(StreamOutput(make_frame(0), Outcome.RESTORED, time.monotonic()))
    assert sample(registry, "kfgan_engine_planned_restored_share") == 0.5
    assert registry.get_sample_value("kfgan_engine_planned_restorations_per_second") == plan.rate


def test_the_stats_are_live_and_the_snapshot_is_a_copy() -> None:
    counts = StreamCounts("s", EngineMetrics())
    live, snapshot = counts.stats, counts.snapshot()
    counts.received(keyframe=False)
    assert live.received == 1 and snapshot.received == 0


def test_stage_timings_are_read_while_worker_threads_add_stages() -> None:
    # GET /streams/ID reads the stage medians on the event loop while face and paste threads
    # add to them; a stage seen for the first time mid-read used to fail the read.
    stages = StageHistory()
    done = threading.Event()

    def add() -> None:
        for n in range(20000):
            stages.add(f"stage{n % 5000}", 0.001)
        done.set()

    worker = threading.Thread(target=add)
    worker.start()
    reads = 0
    while not done.is_set():
        histories = stages.histories()
        assert all(all(value == 0.001 for value in history) for history in histories.values())
        reads += 1
    worker.join()
    assert reads > 0 and len(stages.histories()) == 5000
