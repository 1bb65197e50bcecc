"""The daemon's lifecycle: listen, load and warm the model, serve, drain on SIGTERM, exit 0.

Start-up order: the HTTP server first (``/healthz`` answers and ``/readyz``
says "loading" meanwhile), then the model is loaded and one batch is run on it
in a thread, then the streaming engine starts, what is alive then is exempted
from garbage collection (``engine.heap``), ``/readyz`` turns ready and
systemd hears ``READY=1``. On SIGTERM or SIGINT: ``/readyz`` turns 503
(draining), new offers get 503, live calls go on until their callers hang up,
for at most ``drain_timeout``; then the calls still live hand out the frames
they hold, peers are hung up, the engine stops, and the process exits with
status 0. Under systemd with ``WatchdogSec=``, ``WATCHDOG=1`` is sent from
the event loop at half the interval, so a stuck loop gets the unit restarted.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from aiohttp import web

from kfgan_daemon.engine import EngineSettings, StreamEngine, run_async
from kfgan_daemon.engine.heap import CollectorControl
from kfgan_daemon.errors import KfganError
from kfgan_daemon.service.app import ServiceState, create_app
from kfgan_daemon.service.capacity import CapacityCollector
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.logs import configure_logging
from kfgan_daemon.service.metrics import ServiceMetrics
from kfgan_daemon.service.sessions import SessionManager
from kfgan_daemon.service.vcam import VirtualCameraMirror

log = logging.getLogger(__name__)

# Seconds each shutdown step may take beyond the configured drain.
_CLEANUP_TIMEOUT = 5.0
# Seconds beyond max_latency_ms that the frames a hung-up call holds may take to come out.
_FLUSH_MARGIN = 1.0
# Seconds aiohttp gives open HTTP requests when the server closes.
_HTTP_SHUTDOWN = 1.0


class SystemdNotifier:
    """sd_notify(3) over ``$NOTIFY_SOCKET``; does nothing when the daemon is not run by systemd."""

    def __init__(self) -> None:
        self._notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify

            self._notifier = sdnotify.SystemdNotifier()
            if self._notifier.socket is not None:
                # Called from the event loop: a notification the manager is too busy
                # to take is dropped (sdnotify swallows the error), never waited for.
                self._notifier.socket.setblocking(False)

    @property
    def active(self) -> bool:
        return self._notifier is not None

    def notify(self, state: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(state)

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds when systemd expects pings from this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None


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
        + _flush_seconds(settings) + _CLEANUP_TIMEOUT  # the calls still live hand out their frames
        + _CLEANUP_TIMEOUT  # anything left is hung up
        + _CLEANUP_TIMEOUT  # the engine stops
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


def load_generator(settings: Settings):
    """Open the configured generator and, with ``warmup``, run one batch and load the face models."""
    from kfgan_daemon.restore import StreamRestorer
    from kfgan_daemon.restore.model_choice import open_generator

    generator = open_generator(settings.model, variant=settings.variant, device=settings.device, half=settings.half)
    if settings.warmup:
        generator.warm_up(batch_size=1)
        # The first stream would otherwise load dlib's 100 MB shape predictor on the event loop.
        StreamRestorer(settings.restore_settings())
    return generator


async def run_server(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str], None] | None = None,
    generator_factory: Callable[[Settings], object] = load_generator,
) -> None:
    """Serve until ``stop`` is set or SIGTERM/SIGINT arrives, then drain and return.

    ``on_listening`` gets the base URL (``http://host:port``) as soon as the
    socket is bound, before the model is loaded. ``generator_factory`` builds
    the batch generator in a thread (tests pass a small one).
    Raises :class:`~kfgan_daemon.errors.KfganError` (ModelError, ...) when start-up fails.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    notifier = SystemdNotifier()
    metrics = ServiceMetrics()
    state: ServiceState | None = None

    def engine_getter() -> StreamEngine | None:
        return state.engine if state is not None else None

    mirror = VirtualCameraMirror(settings.virtual_camera, settings.virtual_camera_fps, metrics) if settings.virtual_camera else None

    # Set when the last live call ends: a drain waits on it.
    no_calls = asyncio.Event()

    def session_closed(session) -> None:
        metrics.sessions.set(len(sessions.sessions))
        if not sessions.sessions:
            no_calls.set()
        if mirror is not None:
            mirror.release_session(session)

    sessions = SessionManager(
        settings,
        engine_getter,
        on_keyframe_request=metrics.pli_sent.inc,
        on_frame=mirror.offer if mirror is not None else None,
        on_session_closed=session_closed,
        on_heap_released=lambda released: metrics.heap_release_collect.observe(released.collect_seconds),
    )
    state = ServiceState(settings=settings, metrics=metrics, sessions=sessions, virtual_camera=mirror)
    metrics.instance.info({"instance_id": settings.instance_id})
    metrics.registry.register(CapacityCollector(settings.max_streams, engine_getter, lambda: len(sessions.sessions)))
    app = create_app(state)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, stop.set)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=_HTTP_SHUTDOWN)
    await runner.setup()
    watchdog: asyncio.Task[None] | None = None
    gc_control = CollectorControl(metrics.registry)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        url = _base_url(runner, settings)
        log.info("listening on %s", url)
        if on_listening is not None:
            on_listening(url)
        interval = SystemdNotifier.watchdog_interval() if settings.watchdog else None
        if interval is not None and notifier.active:
            watchdog = loop.create_task(_watchdog(notifier, interval), name="kfgan-watchdog")

        state.set_status("loading", "loading the model")
        notifier.notify("STATUS=loading the model")
        started = time.perf_counter()
        load = loop.run_in_executor(None, generator_factory, settings)
        stopped = loop.create_task(stop.wait())
        done, _ = await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stopped in done:
            log.info("stop requested while the model was loading")
            state.set_status("draining", "stop requested during start-up")
            return
        stopped.cancel()
        try:
            generator = load.result()
        except KfganError as exc:
            state.set_status("failed", str(exc))
            raise
        state.model = _model_description(settings, generator)
        metrics.model.info(state.model)
        engine = StreamEngine(generator, engine_settings(settings), registry=metrics.registry)
        await engine.start()
        if settings.warmup:
            # a detector per face thread now, while no call is live (dlib holds the GIL to build one)
            await engine.warm_up(settings.restore_settings())
        state.engine = engine
        gc_control.freeze()
        state.set_status("ready")
        log.info("ready in %.1f s as instance %s (model %s on %s)", time.perf_counter() - started, settings.instance_id,
                 state.model.get("path"), settings.device)
        notifier.notify(f"READY=1\nSTATUS=serving on {url}")

        await stop.wait()
        log.info("stopping: draining %d session(s) for up to %.1f s; exiting within %.0f s", len(sessions.sessions),
                 settings.drain_timeout, longest_stop(settings))
        notifier.notify("STOPPING=1")
        state.set_status("draining", "shutting down")
        sessions.stop_accepting()
        if sessions.sessions:
            no_calls.clear()
            try:
                await asyncio.wait_for(no_calls.wait(), settings.drain_timeout)
                log.info("every call ended while draining")
            except TimeoutError:
                log.info("hanging up %d call(s) still live after %.1f s", len(sessions.sessions),
                         settings.drain_timeout)
        flush = _flush_seconds(settings)
        await _bounded(sessions.close_all(drain=True, timeout=flush), flush + _CLEANUP_TIMEOUT, "draining the sessions")
    finally:
        sessions.stop_accepting()
        await _bounded(sessions.close_all(drain=False), _CLEANUP_TIMEOUT, "hanging up")
        if state.engine is not None and state.engine.running:
            await _bounded(state.engine.stop(drain=False), _CLEANUP_TIMEOUT, "stopping the engine")
        if mirror is not None:
            mirror.close()
        if watchdog is not None:
            watchdog.cancel()
        gc_control.close()
        await runner.cleanup()
        for signum in handled:
            loop.remove_signal_handler(signum)
        log.info("stopped")


async def _bounded(coro, timeout: float, what: str) -> None:
    """Await ``coro`` for at most ``timeout`` seconds; a stuck shutdown step must not keep the process alive."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        log.warning("%s did not finish within %.1f s; going on", what, timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %r", what, task.exception())


async def _watchdog(notifier: SystemdNotifier, interval: float) -> None:
    while True:
        notifier.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _base_url(runner: web.AppRunner, settings: Settings) -> str:
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
