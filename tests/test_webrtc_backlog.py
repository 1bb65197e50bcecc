"""The receive side of a WebRTC stream stays bounded: at most a couple of frames, the newest win, I-frames stay."""
from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest
from aiortc import MediaStreamTrack
from av.video.frame import PictureType

from kfgan_daemon.engine import EngineSettings, StreamEngine
from kfgan_daemon.webrtc import RestoredVideoTrack
from kfgan_daemon.webrtc.backlog import BacklogClosed, FrameBacklog
from test_webrtc_loopback import small_generator, wait_for

pytestmark = pytest.mark.timeout(60)


async def test_the_newest_frames_win_and_keyframes_stay() -> None:
    backlog: FrameBacklog[int] = FrameBacklog(capacity=2, max_keyframes=2)
    dropped = [backlog.put(n, keyframe=n in (0, 5)) for n in range(8)]
    assert sum(dropped) == backlog.dropped == 5
    assert [await backlog.get() for _ in range(len(backlog))] == [0, 5, 7]  # held I-frames, then the newest
    for n in range(10, 14):  # I-frames only: the oldest give way beyond max_keyframes
        backlog.put(n, keyframe=True)
    backlog.close()
    assert [await backlog.get(), await backlog.get()] == [12, 13]
    with pytest.raises(BacklogClosed):
        await backlog.get()


class BurstTrack(MediaStreamTrack):
    """A remote track whose queue already holds ``count`` decoded pictures (as aiortc's does after an overload),
    then falls silent. I-frames every ``gop`` pictures."""

    kind = "video"

    def __init__(self, count: int, gop: int) -> None:
        super().__init__()
        self.count = count
        self.gop = gop
        self.sent = 0
        self._silence = asyncio.Event()

    async def recv(self) -> av.VideoFrame:
        if self.sent == self.count:
            await self._silence.wait()
        picture = av.VideoFrame.from_ndarray(np.full((48, 64, 3), self.sent % 256, np.uint8), format="rgb24")
        picture = picture.reformat(format="yuv420p")
        picture.pict_type = PictureType.I if self.sent % self.gop == 0 else PictureType.P
        picture.pts = self.sent * 3600
        self.sent += 1
        return picture


async def test_a_burst_of_300_queued_frames_leaves_a_couple_and_every_keyframe() -> None:
    engine = StreamEngine(small_generator(None), EngineSettings())
    await engine.start()
    source = BurstTrack(300, gop=50)
    track = RestoredVideoTrack(source, engine, stream_id="burst")
    try:
        stream = track.open()
        # Six I-frames and the newest P-frames reach the engine; the rest gave way on receipt.
        await wait_for(lambda: track.frames_in == 300 and stream.stats.received >= 6 + 1, 20, "the burst to be taken")
        await asyncio.sleep(0.2)
        assert stream.stats.keyframes == 6
        assert stream.stats.received <= 6 + 2
        assert track.frames_dropped_on_receive == 300 - stream.stats.received
        registry = engine.metrics.registry
        assert registry.get_sample_value("kfgan_engine_receive_dropped_total", {"stream": "burst"}) == (
            track.frames_dropped_on_receive
        )
        assert registry.get_sample_value("kfgan_engine_receive_backlog_frames", {"stream": "burst"}) == 0
    finally:
        await track.aclose()
        await engine.stop(drain=False)
