"""The streaming engine: live streams, shared CPU threads and one batching inference worker."""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from kfgan_daemon.engine.inference import BatchGenerator, InferenceWorker
from kfgan_daemon.engine.machine import MachineLoad
from kfgan_daemon.engine.metrics import EngineMetrics
from kfgan_daemon.engine.planner import CadencePlanner
from kfgan_daemon.engine.settings import OVERLOAD_POLICIES, EngineSettings, OverloadPolicy
from kfgan_daemon.engine.stream import FrameRestorer, LiveStream, StreamInfo
from kfgan_daemon.errors import ConfigError, EngineError
from kfgan_daemon.face.detector import DetectorProcess
from kfgan_daemon.face.identity import DescriberProcess

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

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
        machine: MachineLoad | None = None,
    ) -> None:
        self.generator = generator
        self.settings = settings or EngineSettings()
        self.metrics = metrics or EngineMetrics(registry)
        self.device = str(getattr(generator, "device", "cpu"))
        self.native_detail = getattr(generator, "native_detail", None)
        self._streams: dict[str, LiveStream] = {}
        self.planner = CadencePlanner(self.settings, machine)
        # dlib's long runs for live streams (descriptors, whole-frame detections), in child processes
        # by model: they hold the GIL for 100 ms and more (face.child).
        self._detectors: dict[tuple[str, str | None], DetectorProcess] = {}
        self._describers: dict[str | None, DescriberProcess] = {}
        self._children_lock = threading.Lock()
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
            on_batch=self.planner.observe_batch,
        )
        self._worker.start()
        self._started = True

    async def warm_up(self, restore_settings: "RestoreSettings | None" = None) -> None:
        """Load the face models streams will use, one detector per face thread, start the child
        processes of live streams' identity checks and whole-frame searches, and time the generator
        (the planner's first measure of this machine), all off the event loop.

        dlib holds the GIL while it builds a detector or reads the shape predictor,
        stalling every thread for up to a second or two on a busy machine: call this
        before the first stream is live (a pipe before it listens, a service before
        it reports ready). Otherwise the first stream opened pays it.
        """
        if not self._started:
            raise EngineError("the engine is not started; await engine.start() first")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _warm_face_models, restore_settings, self.settings.cpu_threads)
        settings = _restore_settings(restore_settings)
        await loop.run_in_executor(self._executor, self._detector_process(settings).warm)
        describer = self._describer_process(settings)
        if describer is not None:
            await loop.run_in_executor(self._executor, describer.warm)
        seconds = await self.inference.run_in_thread(_time_generator, self.generator)
        if seconds is not None:
            self.planner.set_generator_prior(seconds)
            log.info(
                "generator: %.1f ms per crop on %s; capacity estimate %d stream(s) of %dx%d at %g FPS",
                1000 * seconds, self.device, self.planner.capacity(), *self.settings.capacity_reference,
            )

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
        with self._children_lock:
            children = [*self._detectors.values(), *self._describers.values()]
            self._detectors, self._describers = {}, {}
        for child in children:
            await asyncio.get_running_loop().run_in_executor(None, child.close)
        self._started = False

    @property
    def running(self) -> bool:
        return self._started

    def capacity(self) -> int:
        """Live streams this engine estimates it can serve with at least ``min_restored_share`` of their
        frames restored (at least 1), from what it measured on this machine."""
        return self.planner.capacity()

    def capacity_in_use(self) -> float:
        """Open streams over :meth:`capacity` (1: full)."""
        return self.planner.capacity_in_use()

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
        :class:`EngineError` if the engine is not started, the id is in use
        or ``settings.max_streams`` streams are open; :class:`ConfigError` for an unknown policy.
        """
        if not self._started:
            raise EngineError("the engine is not started; await engine.start() first")
        if policy not in OVERLOAD_POLICIES:
            raise ConfigError(f"policy: {policy!r} is not one of {', '.join(OVERLOAD_POLICIES)}")
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
            restorer if restorer is not None else partial(self._build_restorer, restore_settings, realtime),
            self._worker,
            self._executor,
            self.settings,
            self.metrics,
            policy=policy,
            realtime=realtime,
            on_closed=self._forget,
            paste_executor=self._paste_executor,
            planner=self.planner if realtime else None,
        )
        if realtime:
            self.planner.add_stream(stream_id)
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

    def _detector_process(self, settings: "RestoreSettings") -> DetectorProcess:
        """The child process for ``settings``' whole-frame face searches (made on first use)."""
        key = (settings.detector, _path_key(settings.detector_path))
        with self._children_lock:
            process = self._detectors.get(key)
            if process is None:
                process = self._detectors[key] = DetectorProcess(settings.detector, settings.detector_path)
            return process

    def _describer_process(self, settings: "RestoreSettings") -> DescriberProcess | None:
        """The child process for ``settings``' identity checks (None: no identity check)."""
        if not settings.identity_check:
            return None
        key = _path_key(settings.descriptor_path)
        with self._children_lock:
            process = self._describers.get(key)
            if process is None:
                process = self._describers[key] = DescriberProcess(settings.descriptor_path)
            return process

    def _build_restorer(self, settings: "RestoreSettings | None", realtime: bool) -> FrameRestorer:
        """A stream's restorer (on a worker thread), with the process's face models warmed for every
        face thread (a no-op once done; see :meth:`warm_up`). A live stream's identity checks go to a
        child process, off the frame path; a file's are computed in order, the same every run."""
        from kfgan_daemon.restore import StreamRestorer

        settings = _restore_settings(settings)
        _warm_face_models(settings, self.settings.cpu_threads)
        if not realtime:
            return StreamRestorer(settings, native_detail=self.native_detail)
        return StreamRestorer(
            settings,
            native_detail=self.native_detail,
            describer=self._describer_process(settings),
            full_frame_detector=self._detector_process(settings),
        )

    def _forget(self, stream: LiveStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            self.planner.remove_stream(stream.id)
        self.metrics.forget_stream(stream.id)
        self.metrics.streams_open.set(len(self._streams))
        log.info("stream %s closed: %s", stream.id, stream.stats)


def _path_key(path: object) -> str | None:
    return None if path is None else str(path)


def _restore_settings(settings: "RestoreSettings | None") -> "RestoreSettings":
    from kfgan_daemon.restore import RestoreSettings

    return settings or RestoreSettings()


def _warm_face_models(settings: "RestoreSettings | None", face_threads: int) -> None:
    from kfgan_daemon.face.models import warm_face_models

    settings = _restore_settings(settings)
    warm_face_models(
        settings.detector,
        face_threads,
        predictor_path=settings.predictor_path,
        detector_path=settings.detector_path,
        recognizer_path=settings.descriptor_path,
        recognizer=settings.identity_check,
    )


def _time_generator(generator: BatchGenerator) -> float | None:
    """Seconds per crop of ``generator`` on the calling thread (the inference worker's), or None for
    one that is not a generator of face jobs (a test's double, which warm_up marks)."""
    from kfgan_daemon.restore.generator import seconds_per_crop

    if getattr(generator, "warm_up", None) is None:
        return None
    return seconds_per_crop(generator)


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, else on the default asyncio loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)

