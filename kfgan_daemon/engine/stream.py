"""One live stream inside the engine: ordered, bounded, and never later than its deadline.

Every submitted frame becomes a record that enters two FIFO queues. The *face*
task takes records in order, decides whether each can still be restored in
time, runs the face stage in a thread and hands the face job to the shared
inference worker, whose answer resolves the record. The *emit* task takes the
same records in the same order and waits for each, in a real-time stream at
most until the frame's deadline: a frame whose face stage or generator is late
(a slow first detection, an overloaded generator) goes out unrestored or is
dropped on time, whatever the face task is still doing. Two tasks and FIFO
hand-offs keep the output order equal to the input order while the face stage
of frame N+1 overlaps the generator work of frame N.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from kfgan_daemon.engine.estimate import RecentDuration
from kfgan_daemon.engine.inference import InferenceWorker
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.errors import EngineError, StreamClosedError

if TYPE_CHECKING:
    from kfgan_daemon.media.frame import DecodedFrame
    from kfgan_daemon.restore.job import FaceJob

log = logging.getLogger(__name__)

FPS_WINDOW = 1.0
LATENCY_HISTORY = 1024
STAGE_HISTORY = 512


class FrameRestorer(Protocol):
    """What the engine needs from a stream's restorer (``kfgan_daemon.restore.StreamRestorer``)."""

    def prepare(self, frame: DecodedFrame) -> FaceJob | None: ...

    def observe_keyframe(self, frame: DecodedFrame) -> None: ...

    def complete(self, frame: DecodedFrame, job: FaceJob, restored_crop: np.ndarray) -> DecodedFrame: ...

    def pass_through(self, frame: DecodedFrame) -> DecodedFrame: ...

    @property
    def needs_keyframe(self) -> bool: ...


class Outcome(str, Enum):
    """What happened to a frame that leaves the stream."""

    RESTORED = "restored"
    SKIPPED = "skipped"  # no face, or no keyframe yet: sent untouched, as the restorer decided
    PASSTHROUGH = "passthrough"  # overload: restoration would miss the deadline, sent unrestored
    ERROR = "error"  # an exception in this frame's processing: sent unrestored


@dataclass(slots=True)
class StreamOutput:
    """One frame leaving a stream, in input order. Times are ``time.monotonic()`` seconds."""

    frame: DecodedFrame
    outcome: Outcome
    arrival: float
    emitted: float = 0.0

    @property
    def latency(self) -> float:
        """Seconds the engine added: from arrival (as given to ``submit``) to the result being ready."""
        return self.emitted - self.arrival


@dataclass(slots=True)
class StreamStats:
    received: int = 0
    emitted: int = 0
    restored: int = 0
    skipped: int = 0
    passthrough: int = 0
    dropped: int = 0
    errors: int = 0
    keyframes: int = 0
    deadline_misses: int = 0
    output_overflow: int = 0


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _End:
    """Marks the end of a queue."""


_END = _End()


@dataclass(slots=True)
class _Result:
    """How the face task (or the generator) settled a frame. ``late``: it cannot be restored in time."""

    outcome: Outcome | None
    job: FaceJob | None = None
    crop: np.ndarray | None = None
    late: bool = False


_LATE = _Result(None, late=True)


@dataclass(slots=True)
class _Record:
    """One frame on its way through the stream."""

    frame: DecodedFrame
    arrival: float
    deadline: float | None  # time.monotonic(); None when every frame is restored
    result: asyncio.Future[_Result]  # cancelled by the emit task when it gives up on the frame
    inference: asyncio.Future[np.ndarray] | None = None


@dataclass(slots=True)
class _Gauges:
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_HISTORY))
    emitted_at: deque[float] = field(default_factory=deque)
    stages: dict[str, deque[float]] = field(default_factory=dict)

    def add_stage(self, stage: str, seconds: float) -> None:
        history = self.stages.get(stage)
        if history is None:
            history = self.stages.setdefault(stage, deque(maxlen=STAGE_HISTORY))
        history.append(seconds)


class LiveStream:
    """A stream of frames through the engine. Made by :meth:`StreamEngine.open_stream`, not directly.

    Drive it from any producer and any consumer, e.g. an RTP receive loop and
    an RTP send loop, or a WebRTC track's ``recv()``::

        await stream.submit(frame, arrival=t_last_packet)   # producer
        async for out in stream.results(): ...              # consumer
        out = await stream.next_output()                    # or one at a time

    ``realtime=True`` (live outputs): the added latency stays under
    ``settings.max_latency``; frames that cannot make it are sent unrestored
    (``policy="passthrough"``) or not at all (``policy="drop"``), and I-frames
    still reach the keyframe store. ``realtime=False`` (files): every frame is
    restored in order, with backpressure on ``submit``. In both modes the output
    order is the input order and an exception affects only the frame it hit.
    """

    def __init__(
        self,
        stream_id: str,
        restorer: FrameRestorer,
        worker: InferenceWorker,
        executor: Executor,
        settings: EngineSettings,
        metrics: EngineMetrics,
        policy: OverloadPolicy = "passthrough",
        realtime: bool = True,
        on_closed: Callable[["LiveStream"], None] | None = None,
    ) -> None:
        if policy not in OVERLOAD_POLICIES:
            raise EngineError(f"overload policy must be one of {', '.join(OVERLOAD_POLICIES)}, not {policy!r}")
        self.id = stream_id
        self.restorer = restorer
        self.policy: OverloadPolicy = policy
        self.realtime = realtime
        self.settings = settings
        self.stats = StreamStats()
        self.opened_at = time.time()
        self.last_error: str | None = None
        self._worker = worker
        self._executor = executor
        self._metrics = metrics
        self._on_closed = on_closed
        # _order holds every frame not yet emitted and bounds the stream; _work the
        # ones the face task has not reached yet (always a subset of _order).
        self._order: asyncio.Queue[_Record | _End] = asyncio.Queue(settings.inbox_size + settings.max_in_flight)
        self._work: asyncio.Queue[_Record | _End] = asyncio.Queue()
        self._outbox: asyncio.Queue[StreamOutput | _End] = asyncio.Queue(settings.outbox_size)
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._gauges = _Gauges()
        # recent durations of the CPU stages, for judging whether a frame can still make its deadline
        self._typical = {"prepare": RecentDuration(), "complete": RecentDuration()}
        # The restorer is touched from the executor threads; this lock keeps the
        # face stage (tracker, keyframe store) single-threaded per stream.
        self._face_lock = threading.Lock()
        self._needs_keyframe = True
        self._keyframes_stored: int | None = None
        self._accepting = True
        self._ended = False  # the end marker is in the outbox
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
        await self._order.put(_END)
        self._work.put_nowait(_END)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._order.empty():
            record = self._order.get_nowait()
            if isinstance(record, _Record):
                self._abandon(record)
        while not self._work.empty():
            self._work.get_nowait()
        self._put_end_nowait()
        self._update_queue_gauges()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A bug in the engine itself: end this stream visibly, never the others.
            log.error("stream %s: %s failed", self.id, task.get_name(), exc_info=exc)
            self.last_error = repr(exc)
            self._accepting = False
            self._put_end_nowait()

    # ---- producer / consumer --------------------------------------------

    async def submit(self, frame: DecodedFrame, arrival: float | None = None) -> None:
        """Hand one decoded frame to the stream (from one producer task).

        ``arrival`` is when the frame became available (``time.monotonic()``;
        for RTP the arrival of its last packet); latency and the real-time
        deadline are measured from it. Waits only while the stream holds
        ``inbox_size + max_in_flight`` frames: in a real-time stream that is
        bounded by the deadline, in a file stream it is the backpressure.
        """
        if not self._accepting:
            raise StreamClosedError(f"stream {self.id} is closed")
        if arrival is None:
            arrival = time.monotonic()
        self.stats.received += 1
        self._metrics.frames_received.labels(self.id).inc()
        if frame.is_keyframe:
            self.stats.keyframes += 1
            self._metrics.keyframes.labels(self.id).inc()
        deadline = arrival + self.settings.max_latency if self.realtime else None
        record = _Record(frame, arrival, deadline, asyncio.get_running_loop().create_future())
        await self._order.put(record)
        self._work.put_nowait(record)
        self._update_queue_gauges()

    async def results(self) -> AsyncIterator[StreamOutput]:
        """Every output frame, in input order, until the stream is closed."""
        while True:
            item = await self._outbox.get()
            if isinstance(item, _End):
                self._outbox.put_nowait(item)  # let any other reader finish too
                return
            self._update_queue_gauges()
            yield item

    async def next_output(self) -> StreamOutput:
        """The next output frame; raises :class:`StreamClosedError` once the stream has ended."""
        item = await self._outbox.get()
        if isinstance(item, _End):
            self._outbox.put_nowait(item)
            raise StreamClosedError(f"stream {self.id} has ended")
        self._update_queue_gauges()
        return item

    # ---- inspection -------------------------------------------------------

    @property
    def needs_keyframe(self) -> bool:
        """The restorer's wish for an I-frame (empty store or no keyframe near the pose), as of the last frame."""
        return self._needs_keyframe

    @property
    def fps(self) -> float:
        self._trim_fps(time.monotonic())
        return len(self._gauges.emitted_at) / FPS_WINDOW

    def latency_quantiles(self, *quantiles: float) -> list[float | None]:
        """Quantiles (0..1) of the added latency in seconds over the last frames; None before any frame."""
        values = list(self._gauges.latencies)
        if not values:
            return [None for _ in quantiles]
        return [float(np.quantile(values, q)) for q in quantiles]

    def stage_ms(self) -> dict[str, float]:
        """Median milliseconds of each engine stage over the last frames (prepare, inference, complete, total...)."""
        return {
            stage: 1000 * float(np.median(list(history))) for stage, history in self._gauges.stages.items() if history
        }

    def info(self) -> StreamInfo:
        p50, p95 = self.latency_quantiles(0.5, 0.95)
        return StreamInfo(
            id=self.id,
            policy=self.policy,
            realtime=self.realtime,
            state=self._state,
            opened_at=self.opened_at,
            stats=replace(self.stats),
            fps=self.fps,
            latency_p50_ms=None if p50 is None else 1000 * p50,
            latency_p95_ms=None if p95 is None else 1000 * p95,
            queues=self.queue_depths(),
            keyframes_stored=self._keyframes_stored,
            needs_keyframe=self._needs_keyframe,
            last_error=self.last_error,
            stage_ms=self.stage_ms(),
        )

    def queue_depths(self) -> dict[str, int]:
        """inbox: frames the face stage has not reached; pending: frames not yet emitted; outbox: not yet read."""
        return {"inbox": self._work.qsize(), "pending": self._order.qsize(), "outbox": self._outbox.qsize()}

    # ---- face task --------------------------------------------------------

    async def _face_loop(self) -> None:
        while True:
            record = await self._work.get()
            self._update_queue_gauges()
            if isinstance(record, _End):
                return
            await self._face_stage(record)

    async def _face_stage(self, record: _Record) -> None:
        frame = record.frame
        if record.result.done() or (self.realtime and self._must_shed(record)):
            # Given up on, or hopeless: only an I-frame still matters, for the keyframe store.
            await self._observe_keyframe(frame)
            _settle(record, _LATE)
            return
        try:
            job = await self._in_thread("prepare", self._prepare_face, frame)
        except Exception as exc:
            self._count_error("prepare", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        if job is None:
            _settle(record, _Result(Outcome.SKIPPED))
            return
        if record.result.done():
            return  # given up on while its face was prepared (an I-frame is stored already)
        if record.deadline is not None and self._expected_done(time.monotonic()) > record.deadline:
            _settle(record, _LATE)
            return
        await self._in_flight.acquire()  # never waits in real time: _must_shed saw a free slot
        try:
            future = await self._worker.submit(job, self.id, record.deadline)
        except EngineError as exc:
            self._in_flight.release()
            self._count_error("inference", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        record.inference = future
        submitted = time.monotonic()
        future.add_done_callback(lambda done: self._inference_done(record, job, submitted, done))

    def _inference_done(self, record: _Record, job: FaceJob, submitted: float, future: asyncio.Future) -> None:
        self._in_flight.release()
        if future.cancelled():
            _settle(record, _LATE)  # the worker saw it could not finish in time, or the emit task gave up
            return
        exc = future.exception()
        if exc is not None:
            self._count_error("inference", exc)
            _settle(record, _Result(Outcome.ERROR))
            return
        seconds = time.monotonic() - submitted
        self._metrics.stage_seconds.labels(self.id, "inference").observe(seconds)
        self._gauges.add_stage("inference", seconds)
        _settle(record, _Result(Outcome.RESTORED, job, future.result()))

    def _must_shed(self, record: _Record) -> bool:
        """True when this frame cannot be restored before its deadline, judged before spending CPU on it."""
        now = time.monotonic()
        if (
            now - record.arrival >= self.settings.shed_threshold
            or self._in_flight.locked()
            or self._work.qsize() >= max(1, self.settings.inbox_size - 1)
        ):
            return True
        assert record.deadline is not None
        return self._expected_done(now + self._typical["prepare"].predict(now)) > record.deadline

    def _expected_done(self, job_ready: float) -> float:
        """When a frame whose face job is ready at ``job_ready`` would probably be restored."""
        return self._worker.expected_finish(job_ready) + self._typical["complete"].predict(job_ready)

    async def _observe_keyframe(self, frame: DecodedFrame) -> None:
        if not frame.is_keyframe:
            return
        try:
            await self._in_thread("observe_keyframe", self._observe_face, frame)
        except Exception as exc:
            self._count_error("observe_keyframe", exc)

    def _count_error(self, stage: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.last_error = f"{stage}: {exc!r}"
        self._metrics.errors.labels(self.id, stage).inc()
        log.warning("stream %s: %s failed on a frame, passing it through: %r", self.id, stage, exc)

    # ---- emit task --------------------------------------------------------

    async def _emit_loop(self) -> None:
        while True:
            record = await self._order.get()
            self._update_queue_gauges()
            if isinstance(record, _End):
                await self._put_output(None)
                return
            output = await self._emit_one(record)
            if output is not None:
                await self._put_output(output)

    async def _emit_one(self, record: _Record) -> StreamOutput | None:
        frame = record.frame
        timeout = None if record.deadline is None else max(0.0, record.deadline - time.monotonic())
        done, _ = await asyncio.wait({record.result}, timeout=timeout)
        if not done:
            self._abandon(record)
            result = _LATE
        else:
            result = record.result.result()
        if result.late:
            self.stats.deadline_misses += 1
            self._metrics.deadline_misses.labels(self.id).inc()
            if self.policy == "drop":
                self.stats.dropped += 1
                self._metrics.frames.labels(self.id, "dropped").inc()
                return None
            try:
                self.restorer.pass_through(frame)
            except Exception as exc:
                self._count_error("pass_through", exc)
            return StreamOutput(frame, Outcome.PASSTHROUGH, record.arrival)
        assert result.outcome is not None
        if result.outcome is not Outcome.RESTORED:
            return StreamOutput(frame, result.outcome, record.arrival)
        try:
            restored = await self._in_thread("complete", self.restorer.complete, frame, result.job, result.crop)
        except Exception as exc:
            self._count_error("complete", exc)
            return StreamOutput(frame, Outcome.ERROR, record.arrival)
        return StreamOutput(restored, Outcome.RESTORED, record.arrival)

    @staticmethod
    def _abandon(record: _Record) -> None:
        record.result.cancel()
        if record.inference is not None:
            record.inference.cancel()  # withdraws the job if the worker has not taken it yet

    async def _put_output(self, output: StreamOutput | None) -> None:
        if output is not None:
            self._account(output)
        item: StreamOutput | _End = _END if output is None else output
        if self.realtime:
            self._put_evicting(item)
        else:
            await self._outbox.put(item)
        if output is None:
            self._ended = True
        self._update_queue_gauges()

    def _put_end_nowait(self) -> None:
        if not self._ended:
            self._put_evicting(_END)
            self._ended = True

    def _put_evicting(self, item: StreamOutput | _End) -> None:
        """A live consumer that falls behind loses its oldest frames, never the end marker."""
        while self._outbox.full():
            old = self._outbox.get_nowait()
            if isinstance(old, _End):
                self._outbox.put_nowait(old)
                return
            self.stats.output_overflow += 1
            self._metrics.output_overflow.labels(self.id).inc()
        self._outbox.put_nowait(item)

    def _account(self, output: StreamOutput) -> None:
        now = time.monotonic()
        output.emitted = now
        self.stats.emitted += 1
        outcome = output.outcome
        if outcome is Outcome.RESTORED:
            self.stats.restored += 1
        elif outcome is Outcome.SKIPPED:
            self.stats.skipped += 1
        elif outcome is Outcome.PASSTHROUGH:
            self.stats.passthrough += 1
        self._metrics.frames.labels(self.id, outcome.value).inc()
        self._metrics.stage_seconds.labels(self.id, "total").observe(output.latency)
        self._gauges.add_stage("total", output.latency)
        self._gauges.latencies.append(output.latency)
        self._gauges.emitted_at.append(now)
        self._trim_fps(now)
        self._metrics.fps.labels(self.id).set(len(self._gauges.emitted_at) / FPS_WINDOW)

    def _trim_fps(self, now: float) -> None:
        emitted_at = self._gauges.emitted_at
        while emitted_at and now - emitted_at[0] > FPS_WINDOW:
            emitted_at.popleft()

    # ---- threads ------------------------------------------------------------

    async def _in_thread(self, stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed, stage, fn, args)

    def _timed(self, stage: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds = time.perf_counter() - start
            self._metrics.stage_seconds.labels(self.id, stage).observe(seconds)
            self._gauges.add_stage(stage, seconds)
            if stage in self._typical:
                self._typical[stage].observe(seconds)

    def _prepare_face(self, frame: DecodedFrame) -> FaceJob | None:
        with self._face_lock:
            try:
                return self.restorer.prepare(frame)
            finally:
                self._refresh_keyframe_state()

    def _observe_face(self, frame: DecodedFrame) -> None:
        with self._face_lock:
            try:
                self.restorer.observe_keyframe(frame)
            finally:
                self._refresh_keyframe_state()

    def _refresh_keyframe_state(self) -> None:
        """Cache what the event loop may read, computed on the thread that owns the restorer's state."""
        try:
            self._needs_keyframe = bool(self.restorer.needs_keyframe)
        except Exception as exc:
            log.debug("stream %s: needs_keyframe failed: %r", self.id, exc)
        store = getattr(self.restorer, "store", None)
        if store is not None:
            self._keyframes_stored = len(store)

    def _update_queue_gauges(self) -> None:
        for name, depth in self.queue_depths().items():
            self._metrics.queue_depth.labels(self.id, name).set(depth)


def _settle(record: _Record, result: _Result) -> None:
    if not record.result.done():
        record.result.set_result(result)
