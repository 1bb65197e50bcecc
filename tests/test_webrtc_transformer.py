"""RestoredVideoTrack on a real aiortc connection, read directly: timestamps, pass-through identity,
PLI timing, restoration of a real face, and the end of the remote track."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc import AudioStreamTrack, MediaStreamTrack, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from kfgan_daemon.engine import EngineSettings, Outcome, StreamEngine
from kfgan_daemon.media.frame import DecodedFrame, frame_quantiser, is_intra_picture
from kfgan_daemon.webrtc import RestoredVideoTrack
from test_webrtc_loopback import ClipTrack, PatternTrack, first_face_pictures, small_generator, wait_for


class SpyTrack(MediaStreamTrack):
    """Hands the remote track's frames on unchanged, remembering each one."""

    kind = "video"

    def __init__(self, inner: MediaStreamTrack) -> None:
        super().__init__()
        self.inner = inner
        self.frames: list[av.VideoFrame] = []

    async def recv(self) -> av.VideoFrame:
        frame = await self.inner.recv()
        self.frames.append(frame)
        return frame


class Link:
    """A client sending ``source`` to a receiving peer whose remote video is wrapped in a RestoredVideoTrack."""

    def __init__(self, source: MediaStreamTrack, engine: StreamEngine, codec: str | None = None, **track_options) -> None:
        self.client = RTCPeerConnection()
        self.server = RTCPeerConnection()
        transceiver = self.client.addTransceiver(source, direction="sendonly")
        if codec is not None:
            capabilities = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in capabilities if c.mimeType == codec])
        self.restored: asyncio.Future[RestoredVideoTrack] = asyncio.get_running_loop().create_future()
        self.spy: SpyTrack | None = None

        @self.server.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receiver = next(t.receiver for t in self.server.getTransceivers() if t.receiver.track is track)
            self.spy = SpyTrack(track)
            self.restored.set_result(RestoredVideoTrack(self.spy, engine, receiver=receiver, **track_options))

    async def connect(self) -> RestoredVideoTrack:
        await self.client.setLocalDescription(await self.client.createOffer())
        await self.server.setRemoteDescription(self.client.localDescription)
        await self.server.setLocalDescription(await self.server.createAnswer())
        await self.client.setRemoteDescription(self.server.localDescription)
        return await asyncio.wait_for(self.restored, 10)

    async def close(self) -> None:
        if self.restored.done():
            await self.restored.result().aclose()
        await self.client.close()
        await self.server.close()


@pytest.fixture
async def engine():
    started = StreamEngine(small_generator(None), EngineSettings())
    await started.start()
    yield started
    await started.stop(drain=False)


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_frames_keep_the_input_timestamps_and_pass_through_untouched(engine: StreamEngine, codec: str) -> None:
    link = Link(PatternTrack(), engine, codec=codec)
    try:
        track = await link.connect()
        outputs = [await asyncio.wait_for(track.recv(), 10) for _ in range(20)]
        inputs = {frame.pts: frame for frame in link.spy.frames}
        pts = [frame.pts for frame in outputs]
        assert pts == sorted(set(pts)), "output order and uniqueness"
        for frame in outputs:
            source = inputs[frame.pts]
            assert frame.time_base == source.time_base
            # No face in the pattern: the engine skips it and the very decoded picture goes back out.
            assert frame is source
        assert is_intra_picture(link.spy.frames[0]), "the first WebRTC frame is a keyframe and must be seen as one"
        # H.264 pictures come with their quantisers (webrtc.decoder); libvpx reports none.
        reported = [frame_quantiser(frame) is not None for frame in link.spy.frames]
        assert all(reported) if codec == "video/H264" else not any(reported)
        stats = track.stream.stats
        # No face or, on a busy machine, shed (late, nothing to carry): never restored, never lost.
        assert stats.restored == stats.carried_forward == stats.dropped == 0
        assert stats.no_face + stats.shed == stats.emitted >= 20
    finally:
        await link.close()


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_each_pli_is_answered_by_a_keyframe(engine: StreamEngine, codec: str) -> None:
    link = Link(PatternTrack(), engine, codec=codec, pli_interval=0.4)
    try:
        track = await link.connect()
        deadline = time.monotonic() + 30
        while track.keyframe_requester.sent < 4:
            await asyncio.wait_for(track.recv(), 10)
            assert time.monotonic() < deadline, "PLIs are not being sent"
        stop_at = time.monotonic() + 0.6  # let the last PLI's keyframe arrive
        while time.monotonic() < stop_at:
            await asyncio.wait_for(track.recv(), 10)
        arrivals = list(track.keyframe_arrivals)
        for sent in track.keyframe_requester.sent_at:
            # One frame interval plus a loopback round trip; 0.3 s leaves room for a loaded machine.
            assert any(sent < arrival <= sent + 0.3 for arrival in arrivals), (
                f"no keyframe within 0.3 s of the PLI at {sent:.3f}: keyframes at {[round(a, 3) for a in arrivals]}"
            )
        # Rate limit: never two PLIs closer than the interval.
        gaps = np.diff(track.keyframe_requester.sent_at)
        assert (gaps >= 0.4).all()
    finally:
        await link.close()


async def test_remote_end_ends_the_track_and_the_engine_stream(engine: StreamEngine) -> None:
    link = Link(PatternTrack(), engine)
    try:
        track = await link.connect()
        for _ in range(5):
            await asyncio.wait_for(track.recv(), 10)
        stream_id = track.stream_id
        assert stream_id in engine.streams
        await link.client.close()
        await link.server.close()  # the remote track ends
        with pytest.raises(MediaStreamError):
            for _ in range(100):
                await asyncio.wait_for(track.recv(), 10)
        await wait_for(lambda: stream_id not in engine.streams, 5, "the engine stream to close")
        assert track.readyState == "ended"
    finally:
        await link.close()


def test_audio_tracks_are_refused() -> None:
    with pytest.raises(ValueError, match="video track"):
        RestoredVideoTrack(AudioStreamTrack(), engine=None)


@pytest.mark.slow
@pytest.mark.shared
async def test_real_face_is_restored_in_place(media_dir: Path) -> None:
    pictures, fps = first_face_pictures(media_dir, 40)
    # A generous deadline: this checks what restoration does to the picture, not its speed.
    engine = StreamEngine(small_generator(None), EngineSettings(max_latency=5.0))
    await engine.start()
    outcomes: list[tuple[av.VideoFrame, Outcome]] = []
    link = Link(ClipTrack(pictures, fps), engine, on_frame=lambda frame, outcome: outcomes.append((frame, outcome)))
    try:
        track = await link.connect()
        deadline = time.monotonic() + 90
        while sum(outcome is Outcome.RESTORED for _, outcome in outcomes) < 3:
            await asyncio.wait_for(track.recv(), 30)
            assert time.monotonic() < deadline, f"no face restored: {track.stream.info()}"
        inputs = {frame.pts: frame for frame in link.spy.frames}

        def changed(restored_frame: av.VideoFrame) -> float:
            after = DecodedFrame.from_av(restored_frame).y.astype(np.int16)
            return float((np.abs(after - DecodedFrame.from_av(inputs[restored_frame.pts]).y) > 12).mean())

        # Which frames are restored first depends on the plan and on when the identity check of the
        # face found afresh answers; a restored frame after a still one changes little where the
        # codec repeated pixels (repeat_update), so the one that changed most is looked at.
        frame = max((f for f, o in outcomes if o is Outcome.RESTORED), key=changed)
        source = inputs[frame.pts]
        assert frame is not source and frame.time_base == source.time_base
        assert (frame.width, frame.height) == (source.width, source.height)
        restored, original = DecodedFrame.from_av(frame), DecodedFrame.from_av(source)
        assert restored.colour == original.colour
        difference = np.abs(restored.y.astype(np.int16) - original.y)
        # The face (a good part of this close-up) changed; every other pixel is the
        # input's, bit for bit, in every plane (no colour conversion on the way).
        assert (difference > 12).mean() > 0.02
        rows, columns = np.nonzero(difference)
        top, bottom, left, right = rows.min(), rows.max(), columns.min(), columns.max()
        outside = np.ones_like(difference, dtype=bool)
        outside[top : bottom + 1, left : right + 1] = False
        assert outside.mean() > 0.2 and not difference[outside].any()
        # a chroma sample covers a 2x2 block of luma: outside only if all four are (the paste mask's
        # soft edge can round a luma change to 0 where the chroma sample beside it still moved by 1)
        chroma_outside = outside[::2, ::2] & outside[1::2, ::2] & outside[::2, 1::2] & outside[1::2, 1::2]
        assert np.array_equal(restored.u[chroma_outside], original.u[chroma_outside])
        assert np.array_equal(restored.v[chroma_outside], original.v[chroma_outside])
        assert track.stream.info().keyframes_stored >= 1
    finally:
        await link.close()
        await engine.stop(drain=False)
