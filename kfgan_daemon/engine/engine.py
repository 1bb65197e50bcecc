"""The streaming engine: live streams, shared CPU threads and one batching inference worker."""
from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from kfgan_daemon.engine.inference import BatchGenerator, InferenceWorker
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import FrameRestorer, LiveStream, StreamInfo
from kfgan_daemon.errors import EngineError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from kfgan_daemon.face.native_detail import NativeDetailFilter
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class StreamEngine:
    """Runs any number of live streams over one generator.

    Usage (inside a running event loop)::

        engine = StreamEngine(generator, EngineSettings(max_batch=4))
        await engine.start()
        stream = engine.open_stream("cam1", policy="passthrough", realtime=True)
        ...                                   # submit frames, read results
        await engine.close_stream("cam1")
        await engine.stop()                   # drains the streams still open

    ``generator`` is a :class:`kfgan_daemon.restore.CropGenerator` (any callable
    taking a list of FaceJobs and returning that many restored crops works);
    its ``device`` names the inference worker in the metrics, and its
    ``native_detail``, if any, goes to every stream's paste.
    """

    def __init__(
        self,
        generator: BatchGenerator,
        settings: EngineSettings | None = None,
        *,
        registry: "CollectorRegistry | None" = None,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.generator = generator
        self.settings = settings or EngineSettings()
        self.metrics = metrics or EngineMetrics(registry)
        self.device = str(getattr(generator, "device", "cpu"))
        self.native_detail = getattr(generator, "native_detail", None)
        self._streams: dict[str, LiveStream] = {}
        self._worker: InferenceWorker | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._paste_executor: ThreadPoolExecutor | None = None
        self._ids = itertools.count(1)
        self._started = False

    # ---- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Start the inference worker and the CPU threads. Idempotent."""
        if self._started:
            return
        self._limit_cpu_inference_threads()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.cpu_threads, thread_name_prefix="kfgan-cpu")
        self._paste_executor = ThreadPoolExecutor(max_workers=self.settings.cpu_threads, thread_name_prefix="kfgan-paste")
        self._worker = InferenceWorker(
            self.generator,
            device=self.device,
            max_batch=self.settings.max_batch,
            max_wait=self.settings.max_batch_wait,
            queue_size=self.settings.inference_queue_size,
            metrics=self.metrics,
            open_streams=lambda: len(self._streams),
        )
        self._worker.start()
        self._started = True

    async def warm_up(self, restore_settings: "RestoreSettings | None" = None) -> None:
        """Load the face models streams will use, one detector per face thread, on a worker thread.

        dlib holds the GIL while it builds a detector or reads the shape predictor,
        stalling every thread for up to a second or two on a busy machine: call this
        before the first stream is live (a pipe before it listens, a service before
        it reports ready). Otherwise the first stream opened pays it.
        """
        if not self._started:
            raise EngineError("the engine is not started; await engine.start() first")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _warm_face_models, restore_settings, self.settings.cpu_threads)

    async def stop(self, drain: bool = True, timeout: float | None = 10.0) -> None:
        """Close every stream (draining what was submitted, up to ``timeout`` seconds each), then stop."""
        if not self._started:
            return
        streams = list(self._streams.values())
        await asyncio.gather(*(stream.close(drain=drain, timeout=timeout) for stream in streams), return_exceptions=True)
        assert self._worker is not None and self._executor is not None
        await self._worker.stop()
        # A face step may still be running (abandoned frames); wait for it off the loop.
        executors = [self._executor, self._paste_executor]

        def shut_down() -> None:
            for executor in executors:
                if executor is not None:
                    executor.shutdown(wait=True, cancel_futures=True)

        await asyncio.get_running_loop().run_in_executor(None, shut_down)
        self._started = False

    @property
    def running(self) -> bool:
        return self._started

    def _limit_cpu_inference_threads(self) -> None:
        threads = self.settings.inference_threads
        if threads is None or not self.device.startswith("cpu"):
            return
        import torch

        if torch.get_num_threads() != threads:
            log.info("CPU generator: %d intra-op thread(s) (was %d)", threads, torch.get_num_threads())
            torch.set_num_threads(threads)

    async def __aenter__(self) -> "StreamEngine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # ---- streams -----------------------------------------------------------

    def open_stream(
        self,
        stream_id: str | None = None,
        policy: OverloadPolicy = "passthrough",
        realtime: bool = True,
        restore_settings: "RestoreSettings | None" = None,
        restorer: FrameRestorer | None = None,
    ) -> LiveStream:
        """Open a stream and start its tasks; call from the engine's event loop.

        ``stream_id`` defaults to ``stream-N``. A new
        :class:`~kfgan_daemon.restore.StreamRestorer` is made from
        ``restore_settings`` unless ``restorer`` is given, on a worker thread:
        the first one imports the restoration code and loads the face models
        (unless :meth:`warm_up` did), seconds that must not stall the loop;
        later ones take the models from the process-wide cache. Raises
        :class:`EngineError` if the engine is not started, the id is in use,
        the policy is unknown or ``settings.max_streams`` streams are open.
        """
        if not self._started:
            raise EngineError("the engine is not started; await engine.start() first")
        if policy not in OVERLOAD_POLICIES:
            raise EngineError(f"overload policy must be one of {', '.join(OVERLOAD_POLICIES)}, not {policy!r}")
        if stream_id is None:
            stream_id = self._next_id()
        if stream_id in self._streams:
            raise EngineError(f"stream id {stream_id!r} is already open")
        limit = self.settings.max_streams
        if limit is not None and len(self._streams) >= limit:
            raise EngineError(f"{limit} streams are open already (max_streams)")
        assert self._worker is not None and self._executor is not None
        stream = LiveStream(
            stream_id,
            restorer
            if restorer is not None
            else partial(_build_restorer, restore_settings, self.settings.cpu_threads, self.native_detail),
            self._worker,
            self._executor,
            self.settings,
            self.metrics,
            policy=policy,
            realtime=realtime,
            on_closed=self._forget,
            paste_executor=self._paste_executor,
        )
        self._streams[stream_id] = stream
        self.metrics.streams_open.set(len(self._streams))
        stream.start()
        log.info("stream %s opened (%s, %s)", stream_id, "real time" if realtime else "every frame", policy)
        return stream

    async def close_stream(self, stream_id: str, drain: bool = True, timeout: float | None = 10.0) -> None:
        """Close one stream (see :meth:`LiveStream.close`). Raises :class:`KeyError` for an unknown id."""
        stream = self._streams.get(stream_id)
        if stream is None:
            raise KeyError(stream_id)
        await stream.close(drain=drain, timeout=timeout)

    def get_stream(self, stream_id: str) -> LiveStream:
        """The open stream with this id; raises :class:`KeyError`."""
        return self._streams[stream_id]

    @property
    def streams(self) -> dict[str, LiveStream]:
        """The open streams by id (a copy)."""
        return dict(self._streams)

    def stream_infos(self) -> list[StreamInfo]:
        """A snapshot of every open stream, for listings."""
        return [stream.info() for stream in self._streams.values()]

    @property
    def inference(self) -> InferenceWorker:
        """The inference worker (batch counters for inspection); only while started."""
        if self._worker is None:
            raise EngineError("the engine is not started")
        return self._worker

    def _next_id(self) -> str:
        while True:
            candidate = f"stream-{next(self._ids)}"
            if candidate not in self._streams:
                return candidate

    def _forget(self, stream: LiveStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        self.metrics.forget_stream(stream.id)
        self.metrics.streams_open.set(len(self._streams))
        log.info("stream %s closed: %s", stream.id, stream.stats)


def _warm_face_models(settings: "RestoreSettings | None", face_threads: int) -> None:
    from kfgan_daemon.face.models import warm_face_models
    from kfgan_daemon.restore import RestoreSettings

    settings = settings or RestoreSettings()
    warm_face_models(
        settings.detector,
        face_threads,
        predictor_path=settings.predictor_path,
        detector_path=settings.detector_path,
        recognizer_path=settings.descriptor_path,
        recognizer=settings.identity_check,
    )


def _build_restorer(
    settings: "RestoreSettings | None", face_threads: int, native_detail: "NativeDetailFilter | None" = None
) -> FrameRestorer:
    """A stream's restorer, with the process's face models warmed for ``face_threads`` threads
    (a no-op once done; see :meth:`StreamEngine.warm_up`)."""
    from kfgan_daemon.restore import StreamRestorer

    _warm_face_models(settings, face_threads)
    return StreamRestorer(settings, native_detail=native_detail)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

