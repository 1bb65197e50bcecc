"""One live stream inside the engine: ordered, bounded, and never slower than its deadline.

A stream runs two tasks. The *prepare* task takes submitted frames in order,
decides whether each can still be restored in time, runs the face stage in a
thread and hands the face job to the shared inference worker. The *emit* task
takes the same records in the same order, waits for each crop (at most until
the frame's deadline in a real-time stream), pastes it back in a thread and
publishes the result. Two tasks and FIFO hand-offs keep the output order equal
to the input order while the face stage of frame N+1 overlaps the generator
work of frame N.
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
TYPICAL_SMOOTHING = 0.2


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _End:
    """Marks the end of a queue."""


_END = _End()


@dataclass(slots=True)
class _Arrival:
    frame: DecodedFrame
    arrival: float


@dataclass(slots=True)
class _Record:
    """One frame between the two tasks: either finished already, or waiting for its crop."""

    frame: DecodedFrame
    arrival: float
    outcome: Outcome | None = None  # set when finished without the generator
    job: FaceJob | None = None
    future: asyncio.Future[np.ndarray] | None = None
    deadline: float | None = None


@dataclass(slots=True)
class _Gauges:
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_HISTORY))
    emitted_at: deque[float] = field(default_factory=deque)


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
        self._inbox: asyncio.Queue[_Arrival | _End] = asyncio.Queue(settings.inbox_size)
        self._pending: asyncio.Queue[_Record | _End] = asyncio.Queue(settings.max_in_flight + settings.inbox_size)
        self._outbox: asyncio.Queue[StreamOutput | _End] = asyncio.Queue(settings.outbox_size)
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._gauges = _Gauges()
        # running means of the CPU stages, for judging whether a frame can still make its deadline
        self._typical = {"prepare": 0.0, "complete": 0.0}
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
            loop.create_task(self._prepare_loop(), name=f"kfgan-stream-{self.id}-prepare"),
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
        await self._inbox.put(_END)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while not self._pending.empty():
            record = self._pending.get_nowait()
            if isinstance(record, _Record) and record.future is not None:
                record.future.cancel()
        while not self._inbox.empty():
            self._inbox.get_nowait()
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
        """Hand one decoded frame to the stream.

        ``arrival`` is when the frame became available (``time.monotonic()``;
        for RTP the arrival of its last packet); latency is measured from it.
        Waits only while the inbox is full: briefly in a real-time stream,
        which sheds late frames, for as long as the consumer needs in a file one.
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
        await self._inbox.put(_Arrival(frame, arrival))
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
        )

    def queue_depths(self) -> dict[str, int]:
        return {"inbox": self._inbox.qsize(), "pending": self._pending.qsize(), "outbox": self._outbox.qsize()}

    # ---- prepare task -------------------------------------------------------

    async def _prepare_loop(self) -> None:
        while True:
            item = await self._inbox.get()
            self._update_queue_gauges()
            if isinstance(item, _End):
                await self._pending.put(_END)
                return
            record = await self._prepare_one(item)
            if record is not None:
                await self._pending.put(record)

    async def _prepare_one(self, item: _Arrival) -> _Record | None:
        frame = item.frame
        if self.realtime and self._must_shed(item):
            await self._observe_keyframe(frame)
            return self._shed(item)
        try:
            job = await self._in_thread("prepare", self._prepare_face, frame)
        except Exception as exc:
            return self._failed(item, "prepare", exc)
        if job is None:
            return _Record(frame, item.arrival, outcome=Outcome.SKIPPED)
        deadline = item.arrival + self.settings.max_latency if self.realtime else None
        if deadline is not None and (time.monotonic() >= deadline or self._in_flight.locked()):
            return self._shed(item)  # prepare already offered an I-frame to the store
        await self._in_flight.acquire()
        try:
            future = await self._worker.submit(job, self.id, deadline)
        except EngineError as exc:
            self._in_flight.release()
            return self._failed(item, "inference", exc)
        submitted = time.monotonic()
        future.add_done_callback(lambda f: self._observe_inference(f, submitted))
        return _Record(frame, item.arrival, job=job, future=future, deadline=deadline)

    def _must_shed(self, item: _Arrival) -> bool:
        """True when this frame cannot be restored before its deadline, judged before spending CPU on it."""
        now = time.monotonic()
        if (
            now - item.arrival >= self.settings.shed_threshold
            or self._in_flight.locked()
            or self._inbox.qsize() >= max(1, self.settings.inbox_size - 1)
        ):
            return True
        done = self._worker.expected_finish(now + self._typical["prepare"]) + self._typical["complete"]
        return done > item.arrival + self.settings.max_latency

    def _shed(self, item: _Arrival) -> _Record | None:
        self.stats.deadline_misses += 1
        self._metrics.deadline_misses.labels(self.id).inc()
        return self._overload_record(item.frame, item.arrival)

    def _overload_record(self, frame: DecodedFrame, arrival: float) -> _Record | None:
        if self.policy == "drop":
            self.stats.dropped += 1
            self._metrics.frames.labels(self.id, "dropped").inc()
            return None
        return _Record(frame, arrival, outcome=Outcome.PASSTHROUGH)

    async def _observe_keyframe(self, frame: DecodedFrame) -> None:
        if not frame.is_keyframe:
            return
        try:
            await self._in_thread("observe_keyframe", self._observe_face, frame)
        except Exception as exc:
            self._count_error("observe_keyframe", exc)

    def _failed(self, item: _Arrival, stage: str, exc: BaseException) -> _Record:
        self._count_error(stage, exc)
        return _Record(item.frame, item.arrival, outcome=Outcome.ERROR)

    def _count_error(self, stage: str, exc: BaseException) -> None:
        self.stats.errors += 1
        self.last_error = f"{stage}: {exc!r}"
        self._metrics.errors.labels(self.id, stage).inc()
        log.warning("stream %s: %s failed on a frame, passing it through: %r", self.id, stage, exc)

    # ---- emit task --------------------------------------------------------

    async def _emit_loop(self) -> None:
        while True:
            record = await self._pending.get()
            self._update_queue_gauges()
            if isinstance(record, _End):
                await self._put_output(None)
                return
            output = await self._resolve(record)
            if output is not None:
                await self._put_output(output)

    async def _resolve(self, record: _Record) -> StreamOutput | None:
        if record.future is None:
            assert record.outcome is not None
            if record.outcome is Outcome.PASSTHROUGH:
                self.restorer.pass_through(record.frame)
            return StreamOutput(record.frame, record.outcome, record.arrival)
        try:
            return await self._finish(record)
        finally:
            self._in_flight.release()

    async def _finish(self, record: _Record) -> StreamOutput | None:
        future = record.future
        assert future is not None and record.job is not None
        timeout = None if record.deadline is None else max(0.0, record.deadline - time.monotonic())
        done, _ = await asyncio.wait({future}, timeout=timeout)
        if not done or future.cancelled():
            future.cancel()  # withdraws the job if the worker has not taken it yet
            self.stats.deadline_misses += 1
            self._metrics.deadline_misses.labels(self.id).inc()
            late = self._overload_record(record.frame, record.arrival)
            if late is None:
                return None
            self.restorer.pass_through(record.frame)
            return StreamOutput(record.frame, Outcome.PASSTHROUGH, record.arrival)
        exc = future.exception()
        if exc is not None:
            self._count_error("inference", exc)
            return StreamOutput(record.frame, Outcome.ERROR, record.arrival)
        try:
            restored = await self._in_thread("complete", self.restorer.complete, record.frame, record.job, future.result())
        except Exception as exc:
            self._count_error("complete", exc)
            return StreamOutput(record.frame, Outcome.ERROR, record.arrival)
        return StreamOutput(restored, Outcome.RESTORED, record.arrival)

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
            if stage in self._typical:
                self._typical[stage] += TYPICAL_SMOOTHING * (seconds - self._typical[stage])

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

    def _observe_inference(self, future: asyncio.Future[np.ndarray], submitted: float) -> None:
        if not future.cancelled() and future.exception() is None:
            self._metrics.stage_seconds.labels(self.id, "inference").observe(time.monotonic() - submitted)

    def _update_queue_gauges(self) -> None:
        for name, depth in self.queue_depths().items():
            self._metrics.queue_depth.labels(self.id, name).set(depth)
