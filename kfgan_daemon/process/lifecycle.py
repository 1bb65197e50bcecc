"""One process lifecycle for every mode of the daemon: start-up, run, shutdown.

In the manner of uvicorn's ``Server``: a :class:`DaemonProcess` runs one
:class:`Mode` (the HTTP service, an RTP pipe, the live bench, a Janus
attachment) through named phases, and owns what every mode shares, so that
no mode writes it again:

- **start-up**: the mode prepares (binds its sockets, so that health checks
  answer while the model loads); the generator is loaded in a thread (a stop
  request meanwhile ends the process without waiting for it); the engine
  starts and warms (face models and the generator's timing, before any frame
  flows: dlib stalls every thread while it loads); the mode starts on the warm
  engine; what is alive then is frozen out of garbage collection
  (:class:`~kfgan_daemon.engine.heap.CollectorControl`); systemd hears
  ``READY=1`` and the watchdog starts.
- **run**: until the mode's own work ends (its input ended, the bench is
  done), SIGINT or SIGTERM arrives, ``stop`` is set, or ``duration`` passes.
- **shutdown**: the mode drains (takes nothing new, lets what is live finish,
  within its own bounds), then closes; the engine stops; the collector is
  released; every step bounded, so a stuck one cannot keep the process alive.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry

from kfgan_daemon.engine.engine import StreamEngine
from kfgan_daemon.engine.heap import CollectorControl
from kfgan_daemon.engine.settings import EngineSettings
from kfgan_daemon.process.signals import stop_on_signals
from kfgan_daemon.process.systemd import SystemdNotifier

if TYPE_CHECKING:
    from kfgan_daemon.engine.inference import BatchGenerator
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

# Seconds each shutdown step may take beyond what the mode's own drain allows.
CLEANUP_TIMEOUT = 5.0


@dataclass(slots=True)
class Runtime:
    """What a started mode works with: the warm engine, the process's collector and its stop request."""

    engine: StreamEngine
    collector: CollectorControl
    stop: asyncio.Event


class Mode(Protocol):
    """What a :class:`DaemonProcess` runs. Each phase is called once, in this order; ``close`` always."""

    name: str

    async def prepare(self) -> None:
        """Before the model loads: bind sockets, check what the mode connects to."""

    async def start(self, runtime: Runtime) -> None:
        """The engine is started and warm: open streams, start taking work."""

    async def run(self) -> None:
        """The mode's own work; returning ends the process (a service never returns)."""

    async def drain(self) -> None:
        """A stop was requested: take nothing new, let what is live finish, within the mode's bounds;
        ``run`` is cancelled when this returns."""

    async def close(self) -> None:
        """Release everything the mode created; also after a failed or interrupted start-up."""

    def ready_status(self) -> str:
        """One line for systemd's status once the mode serves."""


class DaemonProcess:
    """Runs one :class:`Mode` from start-up to exit (see the module's docstring for the phases).

    ``generator``: the batch generator; or ``load``, a function that loads it
    (called in a thread while the mode's sockets already answer). ``warm``: warm the engine
    before the mode starts (tests of start-up order turn it off). ``watchdog``:
    ping systemd's watchdog when the unit asks for it (``WatchdogSec=``).
    ``handle_signals``: SIGINT and SIGTERM request the stop (off for a process
    object that is not the program's own, as in tests).
    """

    def __init__(
        self,
        mode: Mode,
        generator: "BatchGenerator | None" = None,
        *,
        load: "Callable[[], BatchGenerator] | None" = None,
        engine_settings: EngineSettings | None = None,
        restore_settings: "RestoreSettings | None" = None,
        registry: CollectorRegistry | None = None,
        warm: bool = True,
        watchdog: bool = True,
        handle_signals: bool = True,
        stop: asyncio.Event | None = None,
        duration: float | None = None,
        on_loaded: Callable[["BatchGenerator"], None] | None = None,
    ) -> None:
        if (generator is None) == (load is None):
            raise ValueError("give DaemonProcess either a generator or a function that loads one")
        self.mode = mode
        self._generator = generator
        self._load = load
        self.engine_settings = engine_settings or EngineSettings()
        self.restore_settings = restore_settings
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.warm = warm
        self.watchdog = watchdog
        self.handle_signals = handle_signals
        self.stop = stop if stop is not None else asyncio.Event()
        self.duration = duration
        self._on_loaded = on_loaded
        self.notifier = SystemdNotifier()
        self.collector = CollectorControl(self.registry)
        self.engine: StreamEngine | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def serve(self) -> None:
        """Start up, run until stopped, shut down. Raises what a phase raised, after shutting down."""
        with stop_on_signals(self.stop.set) if self.handle_signals else contextlib.nullcontext():
            run: asyncio.Task[None] | None = None
            try:
                if await self.startup():
                    run = await self.main_loop()
            finally:
                await self.shutdown(run)
            if run is not None and run.done() and not run.cancelled() and run.exception() is not None:
                raise run.exception()  # type: ignore[misc]

    async def startup(self) -> bool:
        """Prepare the mode, load the generator, start and warm the engine, start the mode.
        False when a stop request came first."""
        started = time.perf_counter()
        await self.mode.prepare()
        self.notifier.notify("STATUS=loading the model")
        generator = await self._load_generator()
        if generator is None:
            log.info("%s: stop requested while the model was loading", self.mode.name)
            return False
        if self._on_loaded is not None:
            self._on_loaded(generator)
        self.engine = StreamEngine(generator, self.engine_settings, registry=self.registry)
        await self.engine.start()
        if self.warm:
            await self.engine.warm_up(self.restore_settings)
        await self.mode.start(Runtime(self.engine, self.collector, self.stop))
        self.collector.freeze()
        status = self.mode.ready_status()
        log.info("%s: ready in %.1f s: %s", self.mode.name, time.perf_counter() - started, status)
        self.notifier.notify(f"READY=1\nSTATUS={status}")
        if self.watchdog:
            self._watchdog = self.notifier.start_watchdog()
        return True

    async def main_loop(self) -> asyncio.Task[None]:
        """Run the mode until its work ends, a stop is requested or ``duration`` passes."""
        run = asyncio.create_task(self.mode.run(), name=f"kfgan-{self.mode.name}")
        stopped = asyncio.create_task(self.stop.wait())
        await asyncio.wait({run, stopped}, timeout=self.duration, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        return run

    async def shutdown(self, run: asyncio.Task[None] | None) -> None:
        """Drain and close the mode, stop the engine, release the collector; each step bounded."""
        log.info("%s: stopping", self.mode.name)
        self.notifier.notify("STOPPING=1")
        try:
            if run is not None and not run.done():
                await self.mode.drain()
                # What the drain left undone (a service waiting for its next call) is cancelled.
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
        finally:
            await bounded(self.mode.close(), CLEANUP_TIMEOUT, f"{self.mode.name}: closing")
            if self.engine is not None and self.engine.running:
                await bounded(self.engine.stop(drain=False), CLEANUP_TIMEOUT, "stopping the engine")
            if self._watchdog is not None:
                self._watchdog.cancel()
            self.collector.close()
            log.info("%s: stopped", self.mode.name)

    async def _load_generator(self) -> "BatchGenerator | None":
        if self._load is None:
            return self._generator
        load = asyncio.get_running_loop().run_in_executor(None, self._load)
        stopped = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        return load.result() if load in done else None


async def bounded(work: Awaitable[object], timeout: float, what: str) -> None:
    """Await ``work`` for at most ``timeout`` seconds, logging instead of raising: a stuck or failed
    shutdown step must not keep the process alive or skip the steps after it."""
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        log.warning("%s did not finish within %.1f s; going on", what, timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("%s failed: %r", what, task.exception())

