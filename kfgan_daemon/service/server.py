"""``kfgan-daemon serve``: the HTTP service as a mode of the daemon's process lifecycle.

The phases are :class:`~kfgan_daemon.process.DaemonProcess`'s, shared with
``pipe``, ``bench --live`` and ``janus``; what is the service's own is here.
Start-up order: the HTTP server first (``/healthz`` answers and ``/readyz``
says "loading" meanwhile), then the model is loaded and one batch is run on it
in a thread, then the streaming engine starts and warms, ``/readyz`` turns
ready and systemd hears ``READY=1``. On SIGTERM or SIGINT: ``/readyz`` turns
503 (draining), new offers get 503, live calls go on until their callers hang
up, for at most ``drain_timeout``; then the calls still live hand out the
frames they hold, peers are hung up, the engine stops, and the process exits
with status 0.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from kfgan_daemon.engine import EngineSettings, StreamEngine, run_async
from kfgan_daemon.process import CLEANUP_TIMEOUT, DaemonProcess, Runtime, bounded
from kfgan_daemon.service.app import ServiceState, create_app
from kfgan_daemon.service.capacity import CapacityCollector
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.logs import configure_logging
from kfgan_daemon.service.metrics import ServiceMetrics
from kfgan_daemon.service.sessions import SessionManager
from kfgan_daemon.service.vcam import VirtualCameraMirror

log = logging.getLogger(__name__)

# Seconds beyond max_latency_ms that the frames a hung-up call holds may take to come out.
_FLUSH_MARGIN = 1.0
# Seconds aiohttp gives open HTTP requests when the server closes.
_HTTP_SHUTDOWN = 1.0


def _flush_seconds(settings: Settings) -> float:
    return settings.max_latency_ms / 1000 + _FLUSH_MARGIN


def longest_stop(settings: Settings) -> float:
    """Seconds from SIGTERM to exit at most: the drain, then each bounded shutdown step.

    What a supervisor must allow before it kills the daemon (systemd's
    ``TimeoutStopSec``, Kubernetes' ``terminationGracePeriodSeconds`` less any
    ``preStop`` time), or calls lose their last frames and the exit status is not 0.
    """
    return (
        settings.drain_timeout
        + _flush_seconds(settings) + CLEANUP_TIMEOUT  # the calls still live hand out their frames
        + CLEANUP_TIMEOUT  # anything left is hung up
        + CLEANUP_TIMEOUT  # the engine stops
        + _HTTP_SHUTDOWN
    )


def engine_settings(settings: Settings) -> EngineSettings:
    return EngineSettings(
        max_batch=settings.max_batch,
        max_batch_wait=settings.max_batch_wait_ms / 1000,
        max_latency=settings.max_latency_ms / 1000,
        min_restored_share=settings.min_restored_share,
        target_busy=settings.target_busy,
        # Under "auto" the service admits by the engine's measured capacity (service.capacity).
        max_streams=None if settings.max_streams == "auto" else settings.max_streams,
    )


def open_configured_generator(settings: Settings):
    """Open the configured generator and, with ``warmup``, run one batch and load the face models."""
    from kfgan_daemon.restore import StreamRestorer
    from kfgan_daemon.restore.model_choice import open_generator

    restore_settings = settings.restore_settings()
    generator = open_generator(settings.model, variant=settings.variant, device=settings.device, half=settings.half,
                               settings=restore_settings)
    if settings.warmup:
        generator.warm_up(batch_size=1)
        # The first stream would otherwise load dlib's 100 MB shape predictor on the event loop.
        StreamRestorer(restore_settings)
    return generator


class ServiceMode:
    """The HTTP service as a mode of :class:`~kfgan_daemon.process.DaemonProcess`.

    Start-up: the HTTP server first (``/healthz`` answers and ``/readyz`` says
    "loading" while the model loads), ready once the engine is warm. Drain: new
    offers get 503, live calls go on until their callers hang up, for at most
    ``drain_timeout``; then the calls still live hand out the frames they hold.
    Close: peers are hung up, the HTTP server closes.
    """

    name = "serve"

    def __init__(self, settings: Settings, on_listening: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_listening = on_listening
        self.metrics = ServiceMetrics()
        self.url: str | None = None
        self.mirror = (
            VirtualCameraMirror(settings.virtual_camera, settings.virtual_camera_fps, self.metrics)
            if settings.virtual_camera
            else None
        )
        # Set when the last live call ends: a drain waits on it.
        self._no_calls = asyncio.Event()
        self.sessions = SessionManager(
            settings,
            self._engine,
            on_keyframe_request=self.metrics.pli_sent.inc,
            on_frame=self.mirror.offer if self.mirror is not None else None,
            on_session_closed=self._session_closed,
            on_heap_released=lambda released: self.metrics.heap_release_collect.observe(released.collect_seconds),
        )
        self.state = ServiceState(settings=settings, metrics=self.metrics, sessions=self.sessions,
                                  virtual_camera=self.mirror)
        self.metrics.instance.info({"instance_id": settings.instance_id})
        self.metrics.registry.register(
            CapacityCollector(settings.max_streams, self._engine, lambda: len(self.sessions.sessions))
        )
        self._runner = web.AppRunner(
            create_app(self.state), handle_signals=False, access_log=None, shutdown_timeout=_HTTP_SHUTDOWN
        )

    def _engine(self) -> StreamEngine | None:
        return self.state.engine

    def _session_closed(self, session) -> None:
        self.metrics.sessions.set(len(self.sessions.sessions))
        if not self.sessions.sessions:
            self._no_calls.set()
        if self.mirror is not None:
            self.mirror.release_session(session)

    async def prepare(self) -> None:
        self.url = await start_http(self._runner, self.settings)
        if self.on_listening is not None:
            self.on_listening(self.url)
        self.state.set_status("loading", "loading the model")

    def loaded(self, generator: object) -> None:
        self.state.model = _model_description(self.settings, generator)
        self.metrics.model.info(self.state.model)

    async def start(self, runtime: Runtime) -> None:
        self.state.engine = runtime.engine
        self.state.set_status("ready")
        log.info("ready as instance %s (model %s on %s)", self.settings.instance_id,
                 self.state.model.get("path"), self.settings.device)

    async def run(self) -> None:
        await asyncio.Event().wait()  # a service serves until stopped

    async def drain(self) -> None:
        settings = self.settings
        log.info("stopping: draining %d session(s) for up to %.1f s; exiting within %.0f s",
                 len(self.sessions.sessions), settings.drain_timeout, longest_stop(settings))
        self.state.set_status("draining", "shutting down")
        self.sessions.stop_accepting()
        if self.sessions.sessions:
            self._no_calls.clear()
            try:
                await asyncio.wait_for(self._no_calls.wait(), settings.drain_timeout)
                log.info("every call ended while draining")
            except TimeoutError:
                log.info("hanging up %d call(s) still live after %.1f s", len(self.sessions.sessions),
                         settings.drain_timeout)
        flush = _flush_seconds(settings)
        await bounded(self.sessions.close_all(drain=True, timeout=flush), flush + CLEANUP_TIMEOUT,
                      "draining the sessions")

    async def close(self) -> None:
        if self.state.status in ("loading", "ready"):
            self.state.set_status("draining", "stop requested during start-up")
        self.sessions.stop_accepting()
        await bounded(self.sessions.close_all(drain=False), CLEANUP_TIMEOUT, "hanging up")
        if self.mirror is not None:
            self.mirror.close()
        await self._runner.cleanup()

    def ready_status(self) -> str:
        return f"serving on {self.url}"


async def run_server(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str], None] | None = None,
    generator_factory: Callable[[Settings], object] = open_configured_generator,
    handle_signals: bool = True,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and return.

    ``on_listening`` gets the base URL (``http://host:port``) as soon as the
    socket is bound, before the model is loaded. ``generator_factory`` builds
    the batch generator in a thread (tests pass a small one).
    Raises :class:`~kfgan_daemon.errors.KfganError` (ModelError, ...) when start-up fails.
    """
    mode = ServiceMode(settings, on_listening)
    process = DaemonProcess(
        mode,
        load=lambda: generator_factory(settings),
        engine_settings=engine_settings(settings),
        # a detector per face thread now, while no call is live (dlib holds the GIL to build one)
        restore_settings=settings.restore_settings(),
        registry=mode.metrics.registry,
        warm=settings.warmup,
        watchdog=settings.watchdog,
        handle_signals=handle_signals,
        stop=stop,
        on_loaded=mode.loaded,
    )
    await process.serve()


async def start_http(runner: web.AppRunner, settings: Settings) -> str:
    """Set ``runner`` up and listen on the configured host and port; the base URL it listens on (with
    the port it bound when ``settings.port`` is 0)."""
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    url = _listening_url(runner, settings)
    log.info("listening on %s", url)
    return url


def _listening_url(runner: web.AppRunner, settings: Settings) -> str:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            host = address[0]
            return f"http://[{host}]:{address[1]}" if ":" in host else f"http://{host}:{address[1]}"
    return f"http://{settings.host}:{settings.port}"


def _model_description(settings: Settings, generator: object) -> dict[str, str]:
    module = getattr(generator, "module", None)
    parameters = sum(p.numel() for p in module.parameters()) if module is not None else 0
    source = getattr(generator, "source", None)
    return {
        # The file actually loaded (the shipped model, $KFGAN_MODEL or the configured one), not the setting.
        "path": str(source) if source is not None else str(settings.model or "built in code"),
        "architecture": type(module).__name__ if module is not None else type(generator).__name__,
        "parameters": str(parameters),
        "device": settings.device,
        "dtype": "float16" if settings.half else "float32",
    }


def serve(settings: Settings) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (``kfgan-daemon serve``).

    Raises :class:`~kfgan_daemon.errors.KfganError` when start-up fails (the
    CLI prints it and exits non-zero).
    """
    configure_logging(settings.log_level, settings.log_format)
    run_async(run_server(settings))
