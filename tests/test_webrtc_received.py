"""The received view: the pictures a restored track received, handed on in order, newest kept when behind."""
from __future__ import annotations

import asyncio

import av
import pytest
from aiortc.mediastreams import MediaStreamError

from kfgan_daemon.webrtc.received import ReceivedVideoTrack


def _picture(pts: int) -> av.VideoFrame:
    picture = av.VideoFrame(16, 16, "yuv420p")
    picture.pts = pts
    return picture


async def test_pictures_come_out_in_order_and_a_slow_reader_gets_the_newest() -> None:
    view = ReceivedVideoTrack(backlog=2)
    for pts in range(4):
        view.show(_picture(pts))
    assert [(await view.recv()).pts for _ in range(2)] == [2, 3]
    assert (view.frames_shown, view.frames_out) == (4, 2)
    # A reader that waits gets the next picture as soon as it is shown.
    waiting = asyncio.ensure_future(view.recv())
    await asyncio.sleep(0)
    view.show(_picture(9))
    assert (await asyncio.wait_for(waiting, 1)).pts == 9


async def test_stopping_ends_a_waiting_reader_and_drops_later_pictures() -> None:
    view = ReceivedVideoTrack()
    waiting = asyncio.ensure_future(view.recv())
    await asyncio.sleep(0)
    view.stop()
    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(waiting, 1)
    view.show(_picture(1))
    assert view.frames_shown == 0
    with pytest.raises(MediaStreamError):
        await view.recv()
