"""The queues of one stream (engine/queues.py): input order kept for two readers, the bounds, the end marker."""
from __future__ import annotations

import asyncio

import pytest

from engine_support import make_frame
from kfgan_daemon.engine.output import Outcome, StreamOutput
from kfgan_daemon.engine.queues import StreamQueues

pytestmark = pytest.mark.timeout(30)


def make_queues(pending: int = 4, outbox: int = 2, evicting: bool = True) -> tuple[StreamQueues[int], list[int]]:
    evicted: list[int] = []
    queues: StreamQueues[int] = StreamQueues(
        pending, outbox, evicting, on_depths=lambda depths: None, on_evicted=lambda: evicted.append(1)
    )
    return queues, evicted


def output(index: int) -> StreamOutput:
    return StreamOutput(make_frame(index), Outcome.RESTORED, 0.0)


async def test_face_and_emit_read_every_frame_in_input_order_then_the_end() -> None:
    queues, _ = make_queues()
    for n in range(3):
        await queues.put(n)
    assert queues.depths() == {"inbox": 3, "pending": 3, "outbox": 0} and queues.inbox_backlog == 3
    await queues.end_input()
    assert [await queues.next_for_face() for _ in range(4)] == [0, 1, 2, None]
    assert [await queues.next_to_emit() for _ in range(4)] == [0, 1, 2, None]


async def test_put_waits_while_the_stream_holds_as_many_frames_as_it_may() -> None:
    queues, _ = make_queues(pending=2)
    await queues.put(0)
    await queues.put(1)
    third = asyncio.ensure_future(queues.put(2))
    await asyncio.sleep(0.01)
    assert not third.done()
    assert await queues.next_to_emit() == 0
    await asyncio.wait_for(third, 1)


async def test_a_live_outbox_loses_its_oldest_frames_never_the_end() -> None:
    queues, evicted = make_queues(outbox=2)
    for n in range(4):
        await queues.put_output(output(n))
    assert len(evicted) == 2
    queues.end_output_nowait()  # a close: the oldest unread frame makes room for the end
    assert len(evicted) == 3
    queues.end_output_nowait()  # ended once only
    assert len(evicted) == 3
    assert (await queues.get_output()).frame.index == 3  # type: ignore[union-attr]
    assert await queues.get_output() is None
    assert await queues.get_output() is None  # every reader sees the end


async def test_a_file_outbox_waits_for_its_reader() -> None:
    queues, evicted = make_queues(outbox=1, evicting=False)
    await queues.put_output(output(0))
    second = asyncio.ensure_future(queues.put_output(output(1)))
    await asyncio.sleep(0.01)
    assert not second.done()
    assert (await queues.get_output()).frame.index == 0  # type: ignore[union-attr]
    await asyncio.wait_for(second, 1)
    assert not evicted


async def test_clearing_the_input_returns_the_frames_never_emitted() -> None:
    queues, _ = make_queues()
    for n in range(3):
        await queues.put(n)
    assert await queues.next_to_emit() == 0
    await queues.end_input()
    assert queues.clear_input() == [1, 2]
    assert queues.depths() == {"inbox": 0, "pending": 0, "outbox": 0}
