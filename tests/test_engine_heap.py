"""A live process's heap: start-up objects frozen out of garbage collection, every collection timed,
a finished call's memory released.

The soak (test_service_soak) measures what this buys over many calls; here the
mechanism itself: what ``release_heap`` frees, what freezing exempts, and that
a real daemon freezes at ready, releases after a real caller hangs up, and
gives the frozen objects back when it stops (the pipe: test_pipe).
"""
from __future__ import annotations

import asyncio
import gc
import platform
import time
import weakref

import pytest
from prometheus_client import CollectorRegistry

from kfgan_daemon.engine.heap import CollectorControl, release_heap
from test_service_soak import metric
from test_webrtc_loopback import ClientPeer, PatternTrack, start_daemon, stop_daemon

pytestmark = pytest.mark.timeout(120)


class Node:
    """An object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


def garbage_cycle() -> weakref.ref[Node]:
    """Two nodes that refer to each other and to nothing else: freed only by a collection."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


@pytest.fixture
def collector_state():
    enabled = gc.isenabled()
    gc.disable()  # no automatic collection may free the cycles before the call under test does
    yield
    gc.unfreeze()
    if enabled:
        gc.enable()


def test_release_heap_frees_reference_cycles_and_returns_pages(collector_state) -> None:
    cycle = garbage_cycle()
    assert cycle() is not None
    released = release_heap()
    assert cycle() is None
    assert released.unreachable >= 2
    assert released.collect_seconds >= 0.0
    assert released.trimmed == (platform.libc_ver()[0] == "glibc")


def test_frozen_objects_are_not_scanned_until_closed(collector_state) -> None:
    registry = CollectorRegistry()
    control = CollectorControl(registry)
    first, second = Node(), Node()
    first.other, second.other = second, first
    frozen = control.freeze()
    assert frozen == gc.get_freeze_count() > 0
    assert registry.get_sample_value("kfgan_gc_frozen_objects") == frozen
    cycle = weakref.ref(first)
    del first, second
    release_heap()
    assert cycle() is not None, "a frozen object was collected"
    control.close()
    assert gc.get_freeze_count() == 0 and registry.get_sample_value("kfgan_gc_frozen_objects") == 0
    release_heap()
    assert cycle() is None


async def test_daemon_freezes_at_ready_releases_after_a_call_and_unfreezes_on_stop() -> None:
    daemon = await start_daemon(pli_interval=0.5)
    caller = ClientPeer(PatternTrack())
    try:
        assert gc.get_freeze_count() > 0
        # objects frozen at ready that were freed since (by reference counting) are no longer counted
        assert await metric(daemon.http, daemon.url, "kfgan_gc_frozen_objects") >= gc.get_freeze_count()
        releases = "kfgan_heap_release_collect_seconds_count"
        assert await metric(daemon.http, daemon.url, releases) == 0
        await caller.connect(daemon.http, daemon.url)
        await caller.wait_frames(10)
        await caller.close()
        deadline = time.monotonic() + 10
        while await metric(daemon.http, daemon.url, releases) < 1:
            assert time.monotonic() < deadline, "no heap release 10 s after the caller hung up"
            await asyncio.sleep(0.1)
    finally:
        await caller.close()
        await stop_daemon(daemon)
    assert gc.get_freeze_count() == 0


def test_every_collection_is_timed_by_generation(collector_state) -> None:
    registry = CollectorRegistry()
    control = CollectorControl(registry)
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        control.close()
    gc.collect(1)  # not timed any more

    counts = {generation: registry.get_sample_value("kfgan_gc_pause_seconds_count", {"generation": generation})
              for generation in "012"}
    assert counts == {"0": 1.0, "1": 0.0, "2": 1.0}
    assert registry.get_sample_value("kfgan_gc_pause_seconds_sum", {"generation": "2"}) > 0
    totals = control.pause_totals()
    assert {generation: count for generation, (count, _) in totals.items()} == {0: 1, 1: 0, 2: 1}
    assert totals[2][1] == registry.get_sample_value("kfgan_gc_pause_seconds_sum", {"generation": "2"})
