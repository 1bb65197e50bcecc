"""One inference worker per device: batches face jobs from every live stream into generator calls.

The worker is supervised: an exception while running one batch fails that
batch's jobs only (their frames go out unrestored and are counted), and a
worker task that ends any other way than through :meth:`InferenceWorker.stop`
is logged, counted and restarted after a short, growing delay. While it is
down, :attr:`InferenceWorker.running` is false (the service's ``/readyz``
reports not-ready) and submitted jobs wait in the queue for the new worker or
their deadline, whichever comes first.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kfgan_daemon.engine.estimate import ServiceTime
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.errors import EngineError
from kfgan_daemon.logthrottle import ThrottledLog

if TYPE_CHECKING:
    from kfgan_daemon.restore.job import FaceJob

log = logging.getLogger(__name__)
throttled = ThrottledLog(log)

# Restart delays of a worker that keeps dying: doubling from the first to the
# last; a worker that ran longer than _STABLE_RUN since its start counts as healthy again.
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
_STABLE_RUN = 10.0

# A CropGenerator, or anything that maps a list of FaceJobs to as many restored crops.
BatchGenerator = Callable[[Sequence[Any]], list[np.ndarray]]


@dataclass(slots=True, eq=False)
class _Request:
    """One queued job. Compared by identity: field by field would compare FaceJobs' numpy arrays, which raises."""

    job: FaceJob
    stream_id: str
    deadline: float | None  # time.monotonic(); None for streams that process every frame
    future: asyncio.Future[np.ndarray]
    submitted: float


@dataclass(slots=True)
class BatchRecord:
    """What one generator call carried (kept for the last few batches, for tests and inspection)."""

    size: int
    streams: frozenset[str]
    seconds: float


class InferenceWorker:
    """Collects face jobs into batches of at most ``max_batch``, waiting at most ``max_wait`` to fill one.

    The generator runs on a dedicated thread, so the event loop stays free
    while it computes; a single thread per device because a generator (and a
    CUDA stream) is not meant to be driven from two threads at once. The wait
    for more jobs only happens when more than one stream is open: a lone
    stream gains nothing from waiting for its own next frame.
    """

    def __init__(
        self,
        generator: BatchGenerator,
        *,
        device: str = "cpu",
        max_batch: int = 4,
        max_wait: float = 0.005,
        queue_size: int = 64,
        metrics: EngineMetrics | None = None,
        open_streams: Callable[[], int] = lambda: 1,
        history: int = 256,
        restart_delay: float = RESTART_DELAY,
        on_batch: Callable[[int, float, float], None] | None = None,
    ) -> None:
        self.generator = generator
        self.device = device
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.metrics = metrics or EngineMetrics()
        self.restart_delay = restart_delay
        self._open_streams = open_streams
        # Told (size, wall seconds, CPU seconds of the inference thread) after every generator call.
        self._on_batch = on_batch
        self._queue: deque[_Request] = deque()
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._restart: asyncio.TimerHandle | None = None
        self._started_at = 0.0
        self._next_delay = restart_delay
        self._current: list[_Request] = []  # the batch being worked on, failed if the worker dies under it
        self._stopping = False
        self.batches = 0
        self.jobs = 0
        self.multi_stream_batches = 0
        self.failed_batches = 0
        self.restarts = 0
        self.recent: deque[BatchRecord] = deque(maxlen=history)
        self.service_time = ServiceTime()
        self._busy_until = 0.0

    @property
    def running(self) -> bool:
        """True while a worker task is alive to take jobs (false while a dead one waits to be restarted)."""
        return self._task is not None and not self._task.done()

    @property
    def started(self) -> bool:
        """True from :meth:`start` to :meth:`stop`, restarts included."""
        return self._executor is not None and not self._stopping

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self.started:
            return
        self._stopping = False
        self._next_delay = self.restart_delay
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kfgan-infer-{self.device}")
        self._spawn()

    async def stop(self) -> None:
        """Finish the jobs already queued, then stop."""
        if self._executor is None:
            return
        self._stopping = True
        self._arrived.set()
        self._space.set()  # submitters waiting for room learn that the worker is gone
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        try:
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
        finally:
            self._task = None
            for request in self._queue:
                _fail(request.future, EngineError("the inference worker stopped"))
            self._queue.clear()
            self._executor.shutdown(wait=False)
            self._executor = None
            self.metrics.inference_up.labels(self.device).set(0)

    # ---- supervision --------------------------------------------------------------

    def _spawn(self) -> None:
        self._restart = None
        if self._stopping or self._executor is None:
            return
        self._started_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kfgan-inference-{self.device}")
        self._task.add_done_callback(self._ended)
        self.metrics.inference_up.labels(self.device).set(1)
        if self._queue:
            self._arrived.set()

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        self.metrics.inference_up.labels(self.device).set(0)
        self.restarts += 1
        self.metrics.inference_restarts.labels(self.device).inc()
        cause = "was cancelled" if task.cancelled() else f"failed: {task.exception()!r}"
        error = EngineError(f"the inference worker {cause}")
        for request in self._current:
            _fail(request.future, error)
        self._current = []
        self._busy_until = 0.0
        if time.monotonic() - self._started_at > _STABLE_RUN:
            self._next_delay = self.restart_delay
        delay, self._next_delay = self._next_delay, min(MAX_RESTART_DELAY, 2 * self._next_delay)
        log.error(
            "inference worker on %s %s; restarting it in %.1f s (restart %d)",
            self.device, cause, delay, self.restarts,
            exc_info=None if task.cancelled() else task.exception(),
        )
        self._restart = asyncio.get_running_loop().call_later(delay, self._spawn)

    # ---- jobs -----------------------------------------------------------------------

    async def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the inference thread (where the generator's thread settings apply) between batches."""
        if self._executor is None:
            raise EngineError("the inference worker is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def expected_finish(self, now: float) -> float:
        """When a job submitted now would probably be done: after the running batch and the queued jobs."""
        start = max(now, self._busy_until)
        jobs = len(self._queue) + 1
        full_batches, rest = divmod(jobs, self.max_batch)
        return (
            start
            + full_batches * self.service_time.predict(self.max_batch, now)
            + (self.service_time.predict(rest, now) if rest else 0.0)
        )

    async def submit(self, job: FaceJob, stream_id: str, deadline: float | None = None) -> asyncio.Future[np.ndarray]:
        """Queue one job; the returned future resolves to its restored crop.

        Waits while the queue is full. Cancelling the future withdraws the job
        if the worker has not taken it yet. While a dead worker waits to be
        restarted, jobs are still queued (the new worker takes them, or their
        deadline passes); raises :class:`EngineError` once the worker is stopped.
        """
        while len(self._queue) >= self.queue_size and self.started:
            self._space.clear()
            await self._space.wait()
        if not self.started:
            raise EngineError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        request = _Request(job, stream_id, deadline, loop.create_future(), time.monotonic())
        self._queue.append(request)
        self._arrived.set()
        self.metrics.inference_queue.labels(self.device).set(len(self._queue))
        return request.future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if batch is None:
                return
            self._current = batch
            try:
                live = self._discard_stale(batch, time.monotonic())
                if live:
                    await self._execute(live, loop)
            except Exception as exc:  # a bug around the generator call: this batch fails, the worker goes on
                self.failed_batches += 1
                self.metrics.inference_errors.labels(self.device).inc()
                throttled.error(
                    ("batch", self.device), "inference batch of %d on %s failed, its frames go out unrestored: %r",
                    len(batch), self.device, exc,
                )
                error = EngineError(f"the inference batch failed: {exc!r}")
                for request in batch:
                    _fail(request.future, error)
            finally:
                self._busy_until = 0.0
            # Not in the finally: when the task itself dies, _ended fails this batch.
            self._current = []

    async def _collect(self) -> list[_Request] | None:
        while not self._queue:
            if self._stopping:
                return None
            self._arrived.clear()
            await self._arrived.wait()
        batch = [self._queue.popleft()]
        if self.max_wait > 0 and self._open_streams() > 1:
            until = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch and not self._stopping:
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
        while len(batch) < self.max_batch and self._queue:
            batch.append(self._queue.popleft())
        self._space.set()
        self.metrics.inference_queue.labels(self.device).set(len(self._queue))
        return batch

    def _discard_stale(self, batch: list[_Request], now: float) -> list[_Request]:
        """Drop jobs that are withdrawn or past their deadline; put back those that would make the batch late.

        Computing a crop that arrives after its frame was sent is pure loss, and
        it makes the next frames late too: under overload a real-time stream
        would otherwise never catch up. But a batch is late for its earliest
        deadline only because of the jobs beside it (on a CPU a batch of two
        takes twice one): while the predicted end of the batch is past some
        job's deadline, the job with the latest deadline goes back to the front
        of the queue, to run next; a job late on its own is expired.
        """
        live = []
        for request in batch:
            if request.future.done():
                continue  # withdrawn by its stream (its deadline passed there first)
            if request.deadline is not None and now >= request.deadline:
                self._expire(request)
                continue
            live.append(request)
        live.sort(key=lambda r: math.inf if r.deadline is None else r.deadline)
        while live:
            finish = now + self.service_time.predict(len(live), now)
            if not any(r.deadline is not None and r.deadline < finish for r in live):
                break
            if len(live) == 1:
                self._expire(live.pop())
                break
            self._queue.appendleft(live.pop())
        return live

    def _expire(self, request: _Request) -> None:
        request.future.cancel()
        self.metrics.inference_expired.labels(self.device).inc()

    async def _execute(self, batch: list[_Request], loop: asyncio.AbstractEventLoop) -> None:
        jobs = [request.job for request in batch]
        start = time.perf_counter()
        self._busy_until = time.monotonic() + self.service_time.predict(len(jobs), time.monotonic())
        try:
            crops, cpu = await loop.run_in_executor(self._executor, self._call, jobs)
        except Exception as exc:  # the generator failed: isolate the job that did it
            self.metrics.inference_errors.labels(self.device).inc()
            throttled.warning(
                ("generator", self.device), "generator failed on a batch of %d (%r); retrying its jobs one by one",
                len(jobs), exc,
            )
            if len(batch) == 1:
                _fail(batch[0].future, exc)
            else:
                for request in batch:
                    await self._execute_single(request, loop)
            return
        seconds = time.perf_counter() - start
        self._record(batch, seconds, cpu)
        for request, crop in zip(batch, crops, strict=True):
            if not request.future.done():
                request.future.set_result(crop)

    async def _execute_single(self, request: _Request, loop: asyncio.AbstractEventLoop) -> None:
        if request.future.done():
            return
        start = time.perf_counter()
        self._busy_until = time.monotonic() + self.service_time.predict(1, time.monotonic())
        try:
            (crop,), cpu = await loop.run_in_executor(self._executor, self._call, [request.job])
        except Exception as exc:
            self.metrics.inference_errors.labels(self.device).inc()
            _fail(request.future, exc)
            return
        self._record([request], time.perf_counter() - start, cpu)
        if not request.future.done():
            request.future.set_result(crop)

    def _call(self, jobs: list[FaceJob]) -> tuple[list[np.ndarray], float]:
        """The batch's crops and the CPU seconds this thread spent on them (all of a one-thread CPU
        generator's work; a GPU's shows as wall time only)."""
        cpu_start = time.thread_time()
        crops = self.generator(jobs)
        if len(crops) != len(jobs):
            raise EngineError(f"generator returned {len(crops)} crops for {len(jobs)} jobs")
        return crops, time.thread_time() - cpu_start

    def _record(self, batch: list[_Request], seconds: float, cpu_seconds: float) -> None:
        streams = frozenset(request.stream_id for request in batch)
        self.batches += 1
        self.jobs += len(batch)
        if len(streams) > 1:
            self.multi_stream_batches += 1
        self.recent.append(BatchRecord(len(batch), streams, seconds))
        self.service_time.observe(len(batch), seconds)
        self.metrics.batch_size.labels(self.device).observe(len(batch))
        self.metrics.batch_streams.labels(self.device).observe(len(streams))
        self.metrics.batch_seconds.labels(self.device).observe(seconds)
        if self._on_batch is not None:
            self._on_batch(len(batch), seconds, cpu_seconds)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
