"""One live stream inside the engine: ordered, bounded, and never later than its deadline.

Every submitted frame becomes a record that enters two FIFO queues. The *face*
task takes records in order, asks the engine's plan (``engine.planner``)
whether the frame is one of the stream's planned restorations and whether it
can still finish in time, runs the face stage in a thread and hands the face
job to the shared inference worker, whose answer resolves the record. Frames
the plan does not restore get the last correction carried forward. The *emit* task takes the
same records in the same order and waits for each, in a real-time stream at
most until the frame's deadline. A frame that cannot be restored in time (a
slow first detection, an overloaded generator) is not sent as it came: the
last restored correction is carried forward onto it, moved with the face (the
frame's own alignment), so that restored and unrestored pictures never
alternate; only when there is nothing to carry does it go out unrestored
("shed") or, with the ``drop`` policy, not at all. Two tasks and FIFO hand-offs
keep the output order equal to the input order while the face stage of frame
N+1 overlaps the generator work of frame N.

The stream's restorer is built on a worker thread when the stream starts
(dlib detectors take a quarter of a second to build): opening a stream never
blocks the event loop.

:class:`LiveStream` keeps the deadline policy and composes the rest, each
part in its own module: ``engine.queues`` (the order and the bounds),
``engine.restorer`` (the restorer shared by the face and paste threads),
``engine.counts`` (every outcome and stage time, counted once for the stats,
the metrics and the snapshots) and ``engine.planner`` (which frames of a live
stream are restored).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, Future
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from kfgan_daemon.engine.counts import StreamCounts, StreamStats
from kfgan_daemon.engine.inference import InferenceWorker
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.output import Outcome, StreamOutput
from kfgan_daemon.engine.planner import CadencePlanner, StreamPlanInfo
from kfgan_daemon.engine.queues import StreamQueues
from kfgan_daemon.engine.restorer import FrameRestorer, GuardedRestorer
from kfgan_daemon.engine.settings import EngineSettings, OverloadPolicy
from kfgan_daemon.errors import EngineError, StreamClosedError
from kfgan_daemon.logthrottle import ThrottledLog

if TYPE_CHECKING:
    from kfgan_daemon.media.frame import DecodedFrame
    from kfgan_daemon.restore.job import FaceJob

__all__ = [
    "FrameRestorer",
    "LiveStream",
    "Outcome",
    "StreamInfo",
    "StreamOutput",
    "StreamStats",
]

log = logging.getLogger(__name__)
throttled = ThrottledLog(log)


@dataclass(slots=True)
class StreamInfo:
    """A snapshot of one stream for listings and the admin API."""

    id: str
    policy: str
    realtime: bool
    state: str
    opened_at: float  # wall clock (time.time())
    stats: StreamStats
    fps: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    queues: dict[str, int]
    keyframes_stored: int | None
    needs_keyframe: bool
    last_error: str | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    plan: StreamPlanInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class _Result:
    """How the face task (or the generator) settled a frame.

    ``late``: it will not be restored (``planned``: by the plan, else because
    it could not be in time); ``matrix``, when known, is the frame's alignment,
    what carrying the last correction forward needs.
    """

    outcome: Outcome | None
    job: FaceJob | None = None
    crop: np.ndarray | None = None
    late: bool = False
    matrix: np.ndarray | None = None
    planned: bool = False


@dataclass(slots=True)
class _Record:
    """One frame on its way through the stream."""

    frame: DecodedFrame
    arrival: float
    deadline: float | None  # time.monotonic(); None when every frame is restored
    result: asyncio.Future[_Result]  # cancelled by the emit task when it gives up on the frame
    job: FaceJob | None = None  # once the face stage built it
    inference: asyncio.Future[np.ndarray] | None = None
    planned: bool = False  # its restoration is one of the plan's, expected on time


class LiveStream:
    """A stream of frames through the engine. Made by :meth:`StreamEngine.open_stream`, not directly.

    Drive it from any producer and any consumer, e.g. an RTP receive loop and
    an RTP send loop, or a WebRTC track's ``recv()``::

        await stream.submit(frame, arrival=t_last_packet)   # producer
        async for out in stream.results(): ...              # consumer
        out = await stream.next_output()                    # or one at a time

    ``realtime=True`` (live outputs): the added latency stays under
    ``settings.max_latency``; frames that cannot make it are sent with the last
    correction carried forward, else unrestored (``policy="passthrough"``), or
    not at all (``policy="drop"``), and I-frames still reach the keyframe store.
    ``realtime=False`` (files): every frame is restored in order, with
    backpressure on ``submit``. In both modes the output order is the input
    order and an exception affects only the frame it hit.

    ``restorer`` is either a :class:`FrameRestorer` or a callable that builds
    one; a callable runs on the executor when the stream starts.
    """

    def __init__(
        self,
        stream_id: str,
        restorer: FrameRestorer | Callable[[], FrameRestorer],
        worker: InferenceWorker,
        executor: Executor,
        settings: EngineSettings,
        metrics: EngineMetrics,
        policy: OverloadPolicy = "passthrough",
        realtime: bool = True,
        on_closed: Callable[["LiveStream"], None] | None = None,
        paste_executor: Executor | None = None,
        planner: CadencePlanner | None = None,
    ) -> None:
        self.id = stream_id
        self.policy: OverloadPolicy = policy
        self.realtime = realtime
        self.settings = settings
        self.opened_at = time.time()
        self.last_error: str | None = None
        self._face = GuardedRestorer(stream_id, restorer)
        self._worker = worker
        self._executor = executor
        # Pasting (complete, carry_forward) happens at the frame's deadline: queued behind face
        # stages of later frames (a 70 ms identity check, a detection) it would make the frame late.
        self._paste_executor = paste_executor or executor
        self._on_closed = on_closed
        # Which frames a real-time stream restores; None: every frame it can in time.
        self._planner = planner
        self._counts = StreamCounts(stream_id, metrics, planner)
        self._queues: StreamQueues[_Record] = StreamQueues(
            settings.inbox_size + settings.max_in_flight,
            settings.outbox_size,
            evicting=realtime,
            on_depths=self._counts.queues,
            on_evicted=self._counts.overflowed,
        )
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._accepting = True
        self._state = "new"
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()

    # ---- lifecycle -------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._face_loop(), name=f"kfgan-stream-{self.id}-face"),
            loop.create_task(self._emit_loop(), name=f"kfgan-stream-{self.id}-emit"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_ended)
        self._state = "running"

    @property
    def state(self) -> str:
        """new, running, closing or closed."""
        return self._state

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting frames. With ``drain`` the frames already submitted still come out (a consumer
        must keep reading a non-real-time stream meanwhile); after ``timeout`` seconds, or without
        ``drain``, the rest is abandoned. ``results()`` ends either way."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        self._accepting = False
        self._state = "closing"
        try:
            if drain and self._tasks:
                try:
                    await asyncio.wait_for(self._drain(), timeout)
                except TimeoutError:
                    log.warning("stream %s: drain timed out after %.1f s, abandoning the rest", self.id, timeout)
        finally:
            await self._abort()
            self._state = "closed"
            self._closed.set()
            if self._on_closed is not None:
                self._on_closed(self)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _drain(self) -> None:
        await self._queues.end_input()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._face.close()
        # A cancelled task keeps its CancelledError, whose traceback holds this stream:
        # forgetting the tasks breaks that cycle, so a closed stream is freed at once.
        self._tasks = []
        for record in self._queues.clear_input():
            self._abandon(record)
        self._queues.end_output_nowait()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug in the engine itself: end this stream visibly, never the others.
            log.error("stream %s: %s failed", self.id, task.get_name(), exc_info=exc)
            self.last_error = repr(exc)
            self._accepting = False
            self._queues.end_output_nowait()

    # ---- producer / consumer --------------------------------------------

    async def submit(self, frame: DecodedFrame, arrival: float | None = None) -> None:
        """Hand one decoded frame to the stream (from one producer task).

        ``arrival`` is when the frame became available (``time.monotonic()``;
        for RTP the arrival of its last packet), by default ``frame.arrival``
        (set by the RTP receiver), else now; latency and the real-time
        deadline are measured from it, so time spent receiving and decoding
        counts against the budget. Waits only while the stream holds
        ``inbox_size + max_in_flight`` frames: in a real-time stream that is
        bounded by the deadline, in a file stream it is the backpressure.
        """
        if not self._accepting:
            raise StreamClosedError(f"stream {self.id} is closed")
        if arrival is None:
            arrival = frame.arrival if frame.arrival is not None else time.monotonic()
        self._counts.received(frame.is_keyframe)
        if self._planner is not None and self.realtime:
            self._planner.arrived(self.id, arrival, frame.width * frame.height)
        deadline = arrival + self.settings.max_latency if self.realtime else None
        await self._queues.put(_Record(frame, arrival, deadline, asyncio.get_running_loop().create_future()))

    async def results(self) -> AsyncIterator[StreamOutput]:
        """Every output frame, in input order, until the stream is closed."""
        while True:
            output = await self._queues.get_output()
            if output is None:
                return
            yield output

    async def next_output(self) -> StreamOutput:
        """The next output frame; raises :class:`StreamClosedError` once the stream has ended."""
        output = await self._queues.get_output()
        if output is None:
            raise StreamClosedError(f"stream {self.id} has ended")
        return output

    # ---- inspection: read from the stream's counts -----------------------

    @property
    def restorer(self) -> FrameRestorer | None:
        """The stream's restorer; None until it is built."""
        return self._face.restorer

    @property
    def stats(self) -> StreamStats:
        """The stream's counts so far (live: they go on changing)."""
        return self._counts.stats

    @property
    def needs_keyframe(self) -> bool:
        """The restorer's wish for an I-frame (empty store or no keyframe near the pose), as of the last frame."""
        return self._face.needs_keyframe

    @property
    def fps(self) -> float:
        return self._counts.fps

    def latency_quantiles(self, *quantiles: float) -> list[float | None]:
        """Quantiles (0..1) of the added latency in seconds over the last frames; None before any frame."""
        return self._counts.latency_quantiles(*quantiles)

    def stage_ms(self) -> dict[str, float]:
        """Median milliseconds of each engine stage over the last frames (prepare, inference, complete, total...)."""
        return self._counts.stage_ms()

    def info(self) -> StreamInfo:
        p50, p95 = self.latency_quantiles(0.5, 0.95)
        return StreamInfo(
            id=self.id,
            policy=self.policy,
            realtime=self.realtime,
            state=self._state,
            opened_at=self.opened_at,
            stats=self._counts.snapshot(),
            fps=self.fps,
            latency_p50_ms=None if p50 is None else 1000 * p50,
            latency_p95_ms=None if p95 is None else 1000 * p95,
            queues=self.queue_depths(),
            keyframes_stored=self._face.keyframes_stored,
            needs_keyframe=self._face.needs_keyframe,
            last_error=self.last_error,
            stage_ms=self.stage_ms(),
            plan=None if self._planner is None or not self.realtime else self._planner.stream_info(self.id),
        )

    def queue_depths(self) -> dict[str, int]:
        """inbox: frames the face stage has not reached; pending: frames not yet emitted; outbox: not yet read."""
        return self._queues.depths()

    # ---- face task --------------------------------------------------------

    async def _face_loop(self) -> None:
        if not self._face.ready:
            await self._start_restorer()
        while True:
            record = await self._queues.next_for_face()
            if record is None:
                return
            if not self._face.ready:  # it could not be built: every frame goes out as it came
                self._counts.error("start")
                _settle(record, _Result(Outcome.ERROR))
                continue
            await self._face_stage(record)

    async def _start_restorer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            restorer = await loop.run_in_executor(self._executor, self._face.build)
        except Exception as exc:
            self._count_error("start", exc)
            return
        self._face.install(restorer)

    async def _face_stage(self, record: _Record) -> None:
        frame = record.frame
        if record.result.done():
            await self._observe_keyframe(frame)  # sent already: only an I-frame still matters, for the store
            return
        planned = False
        useful_until = record.deadline
        if self.realtime:
            turn = self._turn()
            if turn is None:
                await self._settle_late(record, planned=True)
                return
            planned = record.planned = turn == "planned"
            assert record.deadline is not None
            if not planned:
                # With nothing fit to carry, a crop that misses its own frame still refreshes the
                # correction the next frames carry: worth computing for one more latency budget.
                useful_until = record.deadline + self.settings.max_latency
            if not self._can_start(useful_until):
                if planned and self._planner is not None:
                    self._planner.give_back(self.id)
                await self._settle_late(record)
                return
        try:
            job = await self._in_thread("prepare", self._face.prepare, frame)
        except Exception as exc:
            self._count_error("prepare", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        if job is None:
            reason = self._face.skip_reason or "no_face"
            _settle(record, _Result(Outcome.NO_KEYFRAME if reason == "no_keyframe" else Outcome.NO_FACE))
            return
        record.job = job
        if record.result.done():
            return  # given up on while its face was prepared (an I-frame is stored already)
        if useful_until is not None and self._expected_done(time.monotonic()) > useful_until:
            if planned and self._planner is not None:
                self._planner.give_back(self.id)
            _settle(record, _Result(None, late=True, matrix=job.matrix))
            return
        if self.realtime and not planned and self._planner is not None:
            self._planner.spend(self.id)
        await self._in_flight.acquire()  # never waits in real time: _can_start saw a free slot
        try:
            future = await self._worker.submit(job, self.id, useful_until)
        except EngineError as exc:
            self._in_flight.release()
            self._count_error("inference", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        record.inference = future
        submitted = time.monotonic()
        future.add_done_callback(lambda done: self._inference_done(record, job, submitted, done))

    def _turn(self) -> Literal["planned", "unplanned"] | None:
        """Whether to try restoring this frame: its planned turn, or (unplanned) because there is no
        correction to carry yet (the first frames, a new person), so restoring it is the only way to
        restore anything; None: the plan carries the last correction onto it."""
        if self._planner is None or not self._face.can_carry:
            return "unplanned"
        return "planned" if self._planner.take_turn(self.id) else None

    def _can_start(self, useful_until: float) -> bool:
        """True when a restoration started now would probably be done while still useful, judged before
        spending CPU on it. No work starts that is expected to be thrown away."""
        if self._in_flight.locked() or self._face_backlog():
            return False
        now = time.monotonic()
        return self._expected_done(now + self._counts.expected("prepare", now)) <= useful_until

    async def _settle_late(self, record: _Record, planned: bool = False) -> None:
        """A frame that will not be restored: follow its face, to carry the last correction onto it, if
        that can still be done in time; otherwise the correction goes where the face last was, and
        only an I-frame still needs the face stage, for the keyframe store."""
        frame = record.frame
        if self._followed_recently(frame) or not self._carry_in_time(record):
            await self._observe_keyframe(frame)
            _settle(record, _Result(None, late=True, planned=planned))
            return
        try:
            matrix = await self._in_thread("locate", self._face.locate, frame)
        except Exception as exc:
            self._count_error("locate", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        _settle(
            record,
            _Result(Outcome.NO_FACE) if matrix is None else _Result(None, late=True, matrix=matrix, planned=planned),
        )

    def _followed_recently(self, frame: DecodedFrame) -> bool:
        """True when a frame at most ``unfollowed_carry_frames`` before this one had its face followed:
        its alignment will do for the carried correction, and the face threads stay free."""
        followed = self._face.followed_index
        return (
            self._face.can_carry
            and followed is not None
            and 0 < frame.index - followed <= self.settings.unfollowed_carry_frames
        )

    def _carry_in_time(self, record: _Record) -> bool:
        if not self._face.can_carry or self.policy == "drop" or record.deadline is None:
            return False
        now = time.monotonic()
        cost = self._counts.expected("locate", now) + self._counts.expected("carry_forward", now)
        return now + cost <= record.deadline and not self._face_backlog()

    def _inference_done(self, record: _Record, job: FaceJob, submitted: float, future: asyncio.Future) -> None:
        self._in_flight.release()
        if future.cancelled():
            # the worker saw it could not finish in time, or the stream closed
            self._late(record)
            _settle(record, _Result(None, late=True, matrix=job.matrix))
            return
        exc = future.exception()
        if exc is not None:
            self._count_error("inference", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        self._counts.stage("inference", time.monotonic() - submitted)
        if record.result.done():  # its frame left without it: the crop still refreshes the correction
            self._late(record)
            self._remember_late(record.frame, job, future.result())
            return
        _settle(record, _Result(Outcome.RESTORED, job, future.result()))

    def _late(self, record: _Record) -> None:
        """A restoration came too late for its frame: the plan learns of it if it expected it on time
        (an unplanned one, started only to refresh the correction, may well come late)."""
        if record.planned and self._planner is not None:
            self._planner.late(self.id)

    def _remember_late(self, frame: DecodedFrame, job: FaceJob, crop: np.ndarray) -> None:
        if not self._face.ready or not self._accepting:
            return
        done = self._paste_executor.submit(self._timed, "remember", self._face.remember, (frame, job, crop))
        done.add_done_callback(self._remembered)

    def _remembered(self, done: "Future[Any]") -> None:
        exc = done.exception()
        if exc is not None:
            log.warning("stream %s: keeping a late crop as the correction failed: %r", self.id, exc)

    def _expected_done(self, job_ready: float) -> float:
        """When a frame whose face job is ready at ``job_ready`` would probably be restored."""
        return self._worker.expected_finish(job_ready) + self._counts.expected("complete", job_ready)

    async def _observe_keyframe(self, frame: DecodedFrame) -> None:
        if not frame.is_keyframe:
            return
        try:
            await self._in_thread("observe_keyframe", self._face.observe_keyframe, frame)
        except Exception as exc:
            self._count_error("observe_keyframe", exc)

    def _count_error(self, stage: str, exc: BaseException) -> None:
        self._counts.error(stage)
        self.last_error = f"{stage}: {exc!r}"
        # A fault that hits every frame (e.g. while the inference worker restarts) logs once per interval.
        throttled.warning(
            (self.id, stage), "stream %s: %s failed, the frame goes out unrestored: %r", self.id, stage, exc
        )

    # ---- emit task --------------------------------------------------------

    async def _emit_loop(self) -> None:
        while True:
            record = await self._queues.next_to_emit()
            if record is None:
                await self._put_output(None)
                return
            output = await self._emit_one(record)
            if output is not None:
                await self._put_output(output)

    async def _emit_one(self, record: _Record) -> StreamOutput | None:
        frame = record.frame
        timeout = None
        if record.deadline is not None:
            # leave the time a carried-forward paste takes, so that a late frame still leaves on time
            now = time.monotonic()
            reserve = self._counts.expected("carry_forward", now) if self._face.can_carry else 0.0
            timeout = max(0.0, record.deadline - reserve - now)
        done, _ = await asyncio.wait({record.result}, timeout=timeout)
        if not done:
            if record.job is not None and record.inference is None:
                self._late(record)  # prepared, never reached the generator
            # its crop, if being computed, will still refresh the correction (_inference_done)
            record.result.cancel()
            result = _Result(None, late=True, matrix=None if record.job is None else record.job.matrix)
        else:
            result = record.result.result()
        if result.late:
            return await self._emit_late(record, result)
        assert result.outcome is not None
        if result.outcome is not Outcome.RESTORED:
            return StreamOutput(frame, result.outcome, record.arrival)
        assert self._face.ready
        try:
            restored = await self._in_thread("complete", self._face.complete, frame, result.job, result.crop)
        except Exception as exc:
            self._count_error("complete", exc)
            return StreamOutput(frame, Outcome.ERROR, record.arrival)
        return StreamOutput(restored, Outcome.RESTORED, record.arrival)

    async def _emit_late(self, record: _Record, result: _Result) -> StreamOutput | None:
        frame = record.frame
        if not result.planned:
            self._counts.deadline_missed()
        if self.policy == "drop":
            self._counts.dropped()
            return None
        if not self._face.ready:
            return StreamOutput(frame, Outcome.SHED, record.arrival)
        if self._face.can_carry:
            # result.matrix None: no time to follow this frame's face; the last followed one's alignment serves
            try:
                carried = await self._in_thread("carry_forward", self._face.carry_forward, frame, result.matrix)
            except Exception as exc:
                self._count_error("carry_forward", exc)
                return StreamOutput(frame, Outcome.ERROR, record.arrival)
            if carried is not None:
                return StreamOutput(carried, Outcome.CARRIED_FORWARD, record.arrival)
        try:
            self._face.pass_through(frame)
        except Exception as exc:
            self._count_error("pass_through", exc)
        return StreamOutput(frame, Outcome.SHED, record.arrival)

    @staticmethod
    def _abandon(record: _Record) -> None:
        record.result.cancel()
        if record.inference is not None:
            record.inference.cancel()  # withdraws the job if the worker has not taken it yet

    async def _put_output(self, output: StreamOutput | None) -> None:
        if output is not None:
            self._counts.emitted(output)
        await self._queues.put_output(output)

    # ---- threads ------------------------------------------------------------

    async def _in_thread(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        executor = self._paste_executor if stage in _PASTE_STAGES else self._executor
        return await loop.run_in_executor(executor, self._timed, stage, fn, args)

    def _timed(self, stage: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        start = time.perf_counter()
        cpu_start = time.thread_time()
        try:
            return fn(*args)
        finally:
            self._counts.stage(stage, time.perf_counter() - start, cpu_seconds=time.thread_time() - cpu_start)

    def _face_backlog(self) -> bool:
        """True when frames wait for the face stage: following or restoring more faces only makes it worse."""
        return self._queues.inbox_backlog >= max(1, self.settings.inbox_size - 1)


_PASTE_STAGES = frozenset({"complete", "carry_forward"})


def _settle(record: _Record, result: _Result) -> None:
    if not record.result.done():
        record.result.set_result(result)
