"""The daemon's process lifecycle (kfgan_daemon.process): phases in order, stops at every point, one signal helper.

A recording mode on a real engine (a scripted generator; no warm-up, so no
face models load): what each phase saw, and that whatever happens the mode is
closed, the engine stopped and the collector released.
"""
from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
import time

import pytest

from kfgan_daemon.process import DaemonProcess, Runtime, stop_on_signals
from tests.engine_support import TimedGenerator


class RecordingMode:
    name = "recording"

    def __init__(self, *, run_for: float | None = None, fail_in: str | None = None) -> None:
        self.phases: list[str] = []
        self.run_for = run_for
        self.fail_in = fail_in
        self.runtime: Runtime | None = None

    def _enter(self, phase: str) -> None:
        self.phases.append(phase)
        if self.fail_in == phase:
            raise RuntimeError(f"{phase} failed")

    async def prepare(self) -> None:
        self._enter("prepare")

    async def start(self, runtime: Runtime) -> None:
        self.runtime = runtime
        assert runtime.engine.running
        self._enter("start")

    async def run(self) -> None:
        self._enter("run")
        if self.run_for is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.run_for)

    async def drain(self) -> None:
        self._enter("drain")

    async def close(self) -> None:
        self.phases.append("close")

    def ready_status(self) -> str:
        return "recording"


def process(mode: RecordingMode, **options) -> DaemonProcess:
    options.setdefault("handle_signals", False)
    options.setdefault("warm", False)
    if "load" not in options:
        options["generator"] = TimedGenerator()
    return DaemonProcess(mode, **options)


async def test_phases_in_order_and_a_stop_drains_then_closes() -> None:
    mode = RecordingMode()
    stop = asyncio.Event()
    daemon = process(mode, stop=stop)
    task = asyncio.create_task(daemon.serve())
    while "run" not in mode.phases:
        await asyncio.sleep(0.01)
    assert gc.get_freeze_count() > 0  # what start-up left alive is out of the collector's way
    stop.set()
    await asyncio.wait_for(task, 10)
    assert mode.phases == ["prepare", "start", "run", "drain", "close"]
    assert daemon.engine is not None and not daemon.engine.running


async def test_a_mode_whose_work_ends_ends_the_process_without_a_drain() -> None:
    mode = RecordingMode(run_for=0.05)
    await asyncio.wait_for(process(mode).serve(), 10)
    assert mode.phases == ["prepare", "start", "run", "close"]


async def test_duration_ends_the_run() -> None:
    mode = RecordingMode()
    started = time.monotonic()
    await asyncio.wait_for(process(mode, duration=0.3).serve(), 10)
    assert 0.3 <= time.monotonic() - started < 5
    assert mode.phases[-2:] == ["drain", "close"]


async def test_a_stop_while_the_model_loads_ends_without_starting() -> None:
    loading = threading.Event()

    def slow_load() -> TimedGenerator:
        loading.set()
        time.sleep(0.5)
        return TimedGenerator()

    mode = RecordingMode()
    stop = asyncio.Event()
    task = asyncio.create_task(process(mode, load=slow_load, stop=stop).serve())
    await asyncio.get_running_loop().run_in_executor(None, loading.wait, 5)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert mode.phases == ["prepare", "close"]


@pytest.mark.parametrize("phase", ["prepare", "start", "run"])
async def test_a_failing_phase_raises_after_everything_is_released(phase: str) -> None:
    mode = RecordingMode(fail_in=phase)
    daemon = process(mode)
    with pytest.raises(RuntimeError, match=f"{phase} failed"):
        await asyncio.wait_for(daemon.serve(), 10)
    assert mode.phases[-1] == "close"
    assert daemon.engine is None or not daemon.engine.running


async def test_sigterm_requests_the_stop_and_the_handlers_are_removed_after() -> None:
    mode = RecordingMode()
    daemon = process(mode, handle_signals=True)
    task = asyncio.create_task(daemon.serve())
    while "run" not in mode.phases:
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 10)
    assert mode.phases[-2:] == ["drain", "close"]
    # The loop's handler is gone: the default disposition is back for the rest of the test run.
    assert not asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


def test_the_same_helper_stops_a_loop_without_asyncio() -> None:
    stop = threading.Event()
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals(stop.set) as caught:
        assert set(caught) == {signal.SIGINT, signal.SIGTERM}
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.wait(2)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_process_needs_exactly_one_way_to_the_generator() -> None:
    with pytest.raises(ValueError, match="either a generator or a function"):
        DaemonProcess(RecordingMode())
