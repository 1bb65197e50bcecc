"""The asyncio streaming engine: live streams restored in real time over one batching inference worker.

Public API (stable; the service, WebRTC and pipe code build on it)::

    from kfgan_daemon.engine import EngineSettings, StreamEngine, Outcome

    engine = StreamEngine(generator, EngineSettings(), registry=None)   # generator: CropGenerator
    await engine.start()
    await engine.warm_up(restore_settings)         # face models, their child processes, the generator timed
    engine.capacity() / engine.capacity_in_use()   # live streams this machine serves at the acceptable cadence
    stream = engine.open_stream(stream_id=None, policy="passthrough" | "drop", realtime=True,
                                restore_settings=None, restorer=None)   # -> LiveStream
    await stream.submit(frame, arrival=None)       # DecodedFrame; arrival defaults to frame.arrival (last packet)
    async for out in stream.results(): ...         # StreamOutput(frame, outcome, arrival, emitted), in order
                                                   # outcome: restored | carried_forward | no_face | no_keyframe
                                                   #          | shed | error
    out = await stream.next_output()               # one at a time; StreamClosedError at the end
    stream.needs_keyframe                          # bool, for RTCP PLI
    stream.info() / engine.stream_infos()          # StreamInfo snapshots (.to_dict() for JSON), .plan included
    engine.streams / engine.get_stream(id)         # open LiveStreams by id
    await engine.close_stream(id, drain=True)      # or await stream.close(drain=True, timeout=None)
    await engine.stop()                            # drains every stream, stops the worker
    engine.metrics.registry                        # prometheus_client registry with every engine metric

Real-time streams keep the added latency under ``EngineSettings.max_latency``.
Which of their frames are restored is planned (``engine.planner``): a regular
subset of each stream's frames, fair across streams, sized from what the
machine measurably does. A frame not restored, by the plan or because it could
not be in time, gets the last restored correction carried forward, moved with
its face; with nothing to carry it is sent unrestored ("shed", policy
``passthrough``) or not at all (policy ``drop``).
I-frames reach the keyframe store either way. A stream's restorer is built on
a worker thread: opening a stream never blocks the event loop. Non-real-time streams (files)
restore every frame with backpressure. ``run_async(coro)`` runs a coroutine on
uvloop when it is installed.
"""
from kfgan_daemon.engine.counts import StreamStats
from kfgan_daemon.engine.engine import StreamEngine, run_async
from kfgan_daemon.engine.inference import BatchRecord, InferenceWorker
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.output import Outcome, StreamOutput
from kfgan_daemon.engine.planner import CadencePlanner, PlanSummary, StreamPlanInfo
from kfgan_daemon.engine.restorer import FrameRestorer
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import LiveStream, StreamInfo

__all__ = [
    "OVERLOAD_POLICIES",
    "BatchRecord",
    "CadencePlanner",
    "EngineMetrics",
    "EngineSettings",
    "FrameRestorer",
    "InferenceWorker",
    "LiveStream",
    "Outcome",
    "OverloadPolicy",
    "PlanSummary",
    "StreamEngine",
    "StreamInfo",
    "StreamPlanInfo",
    "StreamOutput",
    "StreamStats",
    "run_async",
]
