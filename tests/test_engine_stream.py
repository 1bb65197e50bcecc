"""The streaming engine's scheduling: order, overload policy, batching across streams, isolation, metrics.

Faces and weights are stood in for by doubles (tests/engine_support.py) so that
the timing is known; test_engine_real.py runs the same engine on real faces.
"""
from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
from prometheus_client import CollectorRegistry

from engine_support import (
    CARRIED_MARK,
    RESTORED_MARK,
    ScriptedRestorer,
    TimedGenerator,
    collect,
    feed,
    make_frame,
    quiet_machine,
)
from kfgan_daemon.engine import EngineSettings, Outcome, StreamEngine
from kfgan_daemon.errors import ConfigError, EngineError, StreamClosedError

pytestmark = pytest.mark.timeout(60)


async def test_file_stream_restores_every_frame_in_order_with_backpressure() -> None:
    generator = TimedGenerator(delay=0.002)
    async with StreamEngine(generator, EngineSettings(inbox_size=2, outbox_size=2, max_in_flight=2)) as engine:
        restorer = ScriptedRestorer()
        stream = engine.open_stream("file", realtime=False, restorer=restorer)
        outputs, _ = await asyncio.gather(collect(stream), feed(stream, 40, fps=None, gop=10, start=3))
    assert [out.frame.index for out in outputs] == list(range(3, 43))
    # frames 3..9 come before the first I-frame (10): no keyframe yet, passed untouched
    assert [out.outcome for out in outputs[:7]] == [Outcome.NO_KEYFRAME] * 7
    assert all(out.outcome is Outcome.RESTORED for out in outputs[7:])
    assert all(out.frame.y[0, 1] == RESTORED_MARK for out in outputs[7:])
    assert stream.stats.restored == 33 and stream.stats.no_keyframe == 7 and stream.stats.no_face == 0
    assert stream.stats.dropped == stream.stats.shed == stream.stats.carried_forward == stream.stats.deadline_misses == 0
    assert restorer.prepared == list(range(3, 43))
    assert not restorer.overlapped


@pytest.mark.parametrize(
    ("policy", "job_seconds"),
    [("passthrough", 0.06), ("drop", 0.06), ("passthrough", 0.25)],
)
async def test_slow_generator_keeps_latency_bounded_and_keyframes_stored(policy: str, job_seconds: float) -> None:
    # 60 ms per crop sustains 16 FPS against 25 FPS input (overloaded); 250 ms never makes the 100 ms budget.
    settings = EngineSettings(max_latency=0.1)
    generator = TimedGenerator(delay=job_seconds, per_job=True)
    registry = CollectorRegistry()
    async with StreamEngine(generator, settings, registry=registry) as engine:
        restorer = ScriptedRestorer()
        stream = engine.open_stream("live", policy=policy, restorer=restorer)
        reader = asyncio.create_task(collect(stream))
        await feed(stream, 50, fps=25, gop=10, close=False)
        await asyncio.sleep(settings.max_latency + 0.05)  # the last frame's deadline
        misses = registry.get_sample_value("kfgan_engine_deadline_misses_total", {"stream": "live"})
        outcome_counts = {
            outcome: registry.get_sample_value("kfgan_engine_frames_total", {"stream": "live", "outcome": outcome}) or 0
            for outcome in ("restored", "carried_forward", "shed", "dropped")
        }
        await stream.close()
        outputs = await reader
    latencies = [out.latency for out in outputs]
    worst = max(latencies)
    print(f"\n{policy} at {1000 * job_seconds:.0f} ms/crop: worst added latency {1000 * worst:.1f} ms, {stream.stats}")
    # the bound is max_latency plus scheduling slack; generous because the test machine is shared
    assert worst < settings.max_latency + 0.15
    indexes = [out.frame.index for out in outputs]
    assert indexes == sorted(indexes)
    # every I-frame reached the store, restored or not
    assert sorted(set(restorer.store)) == [0, 10, 20, 30, 40]
    assert stream.stats.keyframes == 5
    assert misses == stream.stats.deadline_misses > 0
    late = stream.stats.carried_forward + stream.stats.shed
    if policy == "passthrough":
        assert indexes == list(range(50))
        assert late > 0 and outcome_counts["carried_forward"] + outcome_counts["shed"] == late
        assert stream.stats.dropped == 0
        if job_seconds < settings.max_latency:
            # some frames were restored: the late ones after the first carry its correction, moved to their face
            first = next(out.frame.index for out in outputs if out.outcome is Outcome.RESTORED)
            later = [out for out in outputs if out.frame.index > first and out.outcome is not Outcome.RESTORED]
            assert later and all(out.outcome is Outcome.CARRIED_FORWARD for out in later), stream.stats
            assert all(out.frame.y[0, 1] == CARRIED_MARK for out in later)
            assert all(restored < index for index, restored in restorer.carried)
            # a frame right after one whose face was followed reuses that alignment: no face stage for it
            assert len(restorer.located) < stream.stats.carried_forward
    else:
        assert stream.stats.dropped > 0 and outcome_counts["dropped"] == stream.stats.dropped
        assert late == 0
        assert len(outputs) == 50 - stream.stats.dropped


async def test_realtime_stream_restores_everything_when_the_generator_keeps_up() -> None:
    generator = TimedGenerator(delay=0.01)
    async with StreamEngine(generator, EngineSettings(max_latency=0.1), machine=quiet_machine()) as engine:
        stream = engine.open_stream("live", restorer=ScriptedRestorer())
        outputs, _ = await asyncio.gather(collect(stream), feed(stream, 30, fps=50, gop=10))
    assert [out.outcome for out in outputs] == [Outcome.RESTORED] * 30
    assert max(out.latency for out in outputs) < 0.1


async def test_four_streams_share_one_inference_worker_in_mixed_batches() -> None:
    generator = TimedGenerator(delay=0.02)
    settings = EngineSettings(max_batch=4, max_batch_wait=0.005, max_latency=0.3)
    registry = CollectorRegistry()
    async with StreamEngine(generator, settings, registry=registry, machine=quiet_machine()) as engine:
        streams = [engine.open_stream(f"cam{i}", restorer=ScriptedRestorer(name=f"cam{i}")) for i in range(4)]
        results = await asyncio.gather(
            *(collect(s) for s in streams), *(feed(s, 25, fps=25, gop=5) for s in streams)
        )
        worker = engine.inference
        assert worker.multi_stream_batches > 0
        assert max(record.size for record in worker.recent) <= 4
        batches = registry.get_sample_value("kfgan_engine_batch_streams_count", {"device": "cpu"})
        single = registry.get_sample_value("kfgan_engine_batch_streams_bucket", {"device": "cpu", "le": "1.0"})
        assert batches == worker.batches and batches - single == worker.multi_stream_batches
    mixed = [batch for batch in generator.batches if len({stream for stream, _ in batch}) > 1]
    assert mixed, generator.batches
    for name, outputs in zip([s.id for s in streams], results[:4]):
        assert [out.frame.index for out in outputs] == list(range(25)), name
        assert sum(out.outcome is Outcome.RESTORED for out in outputs) >= 20


async def test_one_streams_failures_do_not_touch_another() -> None:
    generator = TimedGenerator(poison="bad")
    async with StreamEngine(
        generator, EngineSettings(max_latency=0.5, max_batch_wait=0.01), machine=quiet_machine()
    ) as engine:
        bad = engine.open_stream("bad", restorer=ScriptedRestorer(name="bad", fail_prepare={3}, fail_complete={5}))
        good = engine.open_stream("good", restorer=ScriptedRestorer(name="good"))
        bad_out, good_out, _, _ = await asyncio.gather(
            collect(bad), collect(good), feed(bad, 20, fps=50), feed(good, 20, fps=50)
        )
    # the good stream never saw an error (a frame may still be late on a busy machine)
    assert [out.frame.index for out in good_out] == list(range(20))
    assert good.stats.errors == 0 and Outcome.ERROR not in {out.outcome for out in good_out}
    assert sum(out.outcome is Outcome.RESTORED for out in good_out) >= 15
    # every generator call holding a 'bad' job raised: its frames went through unrestored, in order
    assert [out.frame.index for out in bad_out] == list(range(20))
    assert {out.outcome for out in bad_out} <= {Outcome.ERROR, Outcome.SHED}
    assert bad.stats.errors == sum(out.outcome is Outcome.ERROR for out in bad_out) >= 15
    assert bad.last_error is not None


async def test_submit_after_close_and_results_end() -> None:
    async with StreamEngine(TimedGenerator()) as engine:
        stream = engine.open_stream(restorer=ScriptedRestorer())
        assert stream.id == "stream-1" and engine.streams == {"stream-1": stream}
        with pytest.raises(EngineError, match="already open"):
            engine.open_stream("stream-1", restorer=ScriptedRestorer())
        with pytest.raises(ConfigError, match="policy: 'queue'"):
            engine.open_stream("x", policy="queue", restorer=ScriptedRestorer())  # type: ignore[arg-type]
        await stream.submit(make_frame(0))
        info = stream.info().to_dict()
        assert info["id"] == "stream-1" and info["state"] == "running" and info["stats"]["received"] == 1
        await engine.close_stream("stream-1")
        assert (await stream.next_output()).frame.index == 0
        with pytest.raises(StreamClosedError):
            await stream.next_output()
        with pytest.raises(StreamClosedError):
            await stream.submit(make_frame(1))
        assert stream.closed and engine.streams == {}


async def test_live_consumer_that_stops_reading_loses_oldest_frames_not_the_engine() -> None:
    async with StreamEngine(TimedGenerator(), EngineSettings(outbox_size=3)) as engine:
        stream = engine.open_stream("lazy", restorer=ScriptedRestorer())
        for i in range(10):
            await stream.submit(make_frame(i))
            await asyncio.sleep(0.01)
        await stream.close()
        outputs = await collect(stream)
    # the outbox holds 3 items, the end marker included: the newest two frames survive
    assert [out.frame.index for out in outputs] == [8, 9]
    assert stream.stats.output_overflow == 8 and stream.stats.emitted == 10


async def test_engine_stop_drains_open_streams_and_limits_streams() -> None:
    engine = StreamEngine(TimedGenerator(delay=0.005), EngineSettings(max_streams=1))
    await engine.start()
    stream = engine.open_stream("only", realtime=False, restorer=ScriptedRestorer())
    with pytest.raises(EngineError, match="max_streams"):
        engine.open_stream("two", restorer=ScriptedRestorer())
    reader = asyncio.create_task(collect(stream))
    for i in range(5):
        await stream.submit(make_frame(i))
    started = time.monotonic()
    await engine.stop()
    outputs = await reader
    assert [out.frame.index for out in outputs] == list(range(5))
    assert time.monotonic() - started < 5
    with pytest.raises(EngineError, match="not started"):
        engine.open_stream("late", restorer=ScriptedRestorer())


def test_run_async_drives_the_engine_on_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    from kfgan_daemon.engine import run_async

    async def main() -> tuple[str, list]:
        async with StreamEngine(TimedGenerator(delay=0.002)) as engine:
            # every frame restored whatever the machine's load: this is about the loop, not the deadline
            stream = engine.open_stream("uv", realtime=False, restorer=ScriptedRestorer())
            outputs, _ = await asyncio.gather(collect(stream), feed(stream, 10, fps=100))
        return type(asyncio.get_running_loop()).__module__, outputs

    loop_module, outputs = run_async(main())
    assert loop_module.startswith(uvloop.__name__)
    assert [out.frame.index for out in outputs] == list(range(10))
    assert all(out.outcome is Outcome.RESTORED for out in outputs)



async def test_a_closed_stream_is_freed_without_the_cycle_collector() -> None:
    # The collector is kept from scanning a live daemon (engine/heap.py): a stream whose parts
    # (queues, counts, restorer guard) pointed back at it would stay until a full collection.
    enabled = gc.isenabled()
    gc.disable()
    try:
        async with StreamEngine(TimedGenerator(delay=0.002)) as engine:
            for realtime in (False, True):
                stream = engine.open_stream(f"freed-{realtime}", realtime=realtime, restorer=ScriptedRestorer())
                await asyncio.gather(collect(stream), feed(stream, 20, fps=100))
                await stream.wait_closed()
                await asyncio.sleep(0.05)  # the last callbacks of the inference futures
                freed = weakref.ref(stream)
                del stream
                assert freed() is None, realtime
    finally:
        if enabled:
            gc.enable()
