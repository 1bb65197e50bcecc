"""Acceptance on loopback: real aiortc peers, real HTTP signalling, real engine and generator.

A client RTCPeerConnection sends video to the daemon's ``POST /offer`` and
receives the restored track back on the same connection: H.264, VP8, keyframe
requests (PLI) while the store is empty, and a real face clip that actually
gets restored when ``../shared/media`` is present.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import torch
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from kfgan_daemon.media import FileSource
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.model.lite import LiteGenerator
from kfgan_daemon.restore import CropGenerator
from kfgan_daemon.service.config import Settings
from kfgan_daemon.service.server import run_server

WIDTH, HEIGHT = 320, 240
FPS = 25


def small_generator(settings: Settings) -> CropGenerator:
    """A real lite generator with random weights, small enough for 2 shared cores.

    The lite model starts as an identity (zero output layer); random output
    weights make it change what it is given, as a trained model does.
    """
    torch.manual_seed(0)
    module = LiteGenerator(channels=8, blocks=1)
    torch.nn.init.normal_(module.tail.weight, std=0.02)
    return CropGenerator(module)


class PatternTrack(VideoStreamTrack):
    """A still test pattern with a slowly moving bar: no scene cuts, so the sender makes I-frames only on request."""

    def __init__(self, width: int = WIDTH, height: int = HEIGHT) -> None:
        super().__init__()
        y, x = np.mgrid[0:height, 0:width]
        self.base = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 90)], axis=-1).astype(np.uint8)
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        image = self.base.copy()
        column = (2 * self.count) % (image.shape[1] - 8)
        image[:, column : column + 8] = 230
        self.count += 1
        frame = DecodedFrame.from_rgb(image, ColourSpace("bt601")).to_av()
        frame.pts, frame.time_base = pts, time_base
        return frame


class ClipTrack(VideoStreamTrack):
    """Plays decoded pictures in a loop at their frame rate (their planes as they are)."""

    def __init__(self, pictures: list[DecodedFrame], fps: int) -> None:
        super().__init__()
        self.pictures = pictures
        self.fps = fps
        self.count = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self.count / self.fps
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        frame = self.pictures[self.count % len(self.pictures)].to_av()
        frame.pts, frame.time_base = self.count * (90000 // self.fps), Fraction(1, 90000)
        self.count += 1
        return frame


@dataclass
class Received:
    at: float
    width: int
    height: int
    pts: int


@dataclass
class ClientPeer:
    """The conferencing endpoint: sends one video track, reads the restored one back."""

    source: VideoStreamTrack
    codec: str | None = None
    frames: list[Received] = field(default_factory=list)
    session: str | None = None

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection()
        transceiver = self.pc.addTransceiver(self.source, direction="sendrecv")
        if self.codec is not None:
            capabilities = RTCRtpSender.getCapabilities("video").codecs
            transceiver.setCodecPreferences([c for c in capabilities if c.mimeType == self.codec])
        self._reader: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        self._reader = asyncio.ensure_future(self._read(track))

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames.append(Received(time.monotonic(), frame.width, frame.height, frame.pts))

    async def offer_sdp(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def connect(self, http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None) -> dict:
        sdp = await self.offer_sdp()
        async with http.post(f"{url}/offer", json={"sdp": sdp, "type": "offer"}, headers=headers) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        assert answer["type"] == "answer"
        self.session = answer["session"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        return answer

    async def wait_frames(self, count: int, timeout: float = 20.0) -> None:
        await wait_for(lambda: len(self.frames) >= count, timeout, f"{count} restored frames (got {len(self.frames)})")

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class Daemon:
    url: str
    http: aiohttp.ClientSession
    stop: asyncio.Event
    task: asyncio.Task[None]
    headers: dict[str, str] = field(default_factory=dict)

    async def get_json(self, path: str) -> dict:
        async with self.http.get(f"{self.url}{path}", headers=self.headers) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def streams(self, session: str) -> list[dict]:
        return (await self.get_json(f"/streams/{session}"))["streams"]


async def start_daemon(generator_factory: Callable[[Settings], object] = small_generator, **overrides) -> Daemon:
    """``run_server`` in this event loop on a free port, waited on until /readyz says ready."""
    settings = Settings.load(port=0, **overrides)
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(
        run_server(settings, stop=stop, on_listening=listening.set_result, generator_factory=generator_factory)
    )
    url = await asyncio.wait_for(asyncio.shield(listening), 20)
    http = aiohttp.ClientSession()
    daemon = Daemon(url, http, stop, task)

    async def ready() -> bool:
        async with http.get(f"{url}/readyz") as response:
            return response.status == 200

    deadline = time.monotonic() + 60
    while not await ready():
        assert not task.done(), task.exception() if not task.cancelled() else "cancelled"
        assert time.monotonic() < deadline, "the daemon did not become ready"
        await asyncio.sleep(0.05)
    return daemon


async def stop_daemon(daemon: Daemon) -> None:
    daemon.stop.set()
    await asyncio.wait_for(daemon.task, 30)
    await daemon.http.close()


@pytest.fixture
async def daemon():
    started = await start_daemon(pli_interval=0.5)
    yield started
    await stop_daemon(started)


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_restored_video_comes_back_on_the_same_connection(daemon: Daemon, codec: str) -> None:
    client = ClientPeer(PatternTrack(), codec=codec)
    try:
        answer = await client.connect(daemon.http, daemon.url)
        await client.wait_frames(25)
        assert {(f.width, f.height) for f in client.frames} == {(WIDTH, HEIGHT)}
        session = await daemon.get_json(f"/streams/{answer['session']}")
        assert session["codecs"] == [codec]
        (stream,) = session["streams"]
        assert stream["frames_in"] >= 25 and stream["frames_out"] >= 25
        # The first frame of any WebRTC stream is a keyframe; it must be seen as one after decoding.
        assert stream["stats"]["keyframes"] >= 1
        # No face in a test pattern: frames pass through untouched (no face, or shed when late
        # on a busy machine), never stall and never vanish.
        stats = stream["stats"]
        assert stats["restored"] == stats["carried_forward"] == stats["dropped"] == 0
        assert stats["no_face"] + stats["shed"] == stats["emitted"] >= 25
    finally:
        await client.close()


async def test_a_receive_only_section_gets_the_call_as_received() -> None:
    # One stream allowed: the receive-only section is not a second stream.
    daemon = await start_daemon(max_streams=1)
    pc = RTCPeerConnection()
    # Listed before the camera's section: each still gets its own video back.
    view = pc.addTransceiver("video", direction="recvonly")
    camera = pc.addTransceiver(PatternTrack(), direction="sendrecv")
    frames: dict[str, list[av.VideoFrame]] = {"received": [], "restored": []}
    readers: list[asyncio.Task[None]] = []

    async def read(track, into: list[av.VideoFrame]) -> None:
        while True:
            try:
                into.append(await track.recv())
            except MediaStreamError:
                return

    @pc.on("track")
    def on_track(track) -> None:
        readers.append(asyncio.ensure_future(read(track, frames["received" if track is view.receiver.track else "restored"])))

    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with daemon.http.post(f"{daemon.url}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        # The daemon only sends on the receive-only section, and sends and receives on the camera's.
        assert (view.currentDirection, camera.currentDirection) == ("recvonly", "sendrecv")
        await wait_for(lambda: min(map(len, frames.values())) >= 25, 30, "25 frames on each track")
        (stream,) = await daemon.streams(answer["session"])
        assert {(f.width, f.height) for f in frames["received"] + frames["restored"]} == {(WIDTH, HEIGHT)}
        # No face in the pattern: both tracks show the same pictures, each restored frame with its received one.
        assert stream["stats"]["restored"] == 0
        shown = {f.pts: f for f in frames["received"]}
        pairs = [(shown[f.pts], f) for f in frames["restored"] if f.pts in shown]
        assert len(pairs) >= 20
        for received, restored in pairs[-5:]:
            difference = received.to_ndarray(format="gray").astype(int) - restored.to_ndarray(format="gray")
            assert np.abs(difference).mean() < 2.0  # two encodes of one picture by the daemon's senders
    finally:
        await pc.close()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await stop_daemon(daemon)


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
async def test_empty_store_sends_pli_and_a_keyframe_follows(daemon: Daemon, codec: str) -> None:
    client = ClientPeer(PatternTrack(), codec=codec)
    try:
        await client.connect(daemon.http, daemon.url)
        await client.wait_frames(5)
        (stream,) = await daemon.streams(client.session)
        assert stream["needs_keyframe"], "a stream with an empty keyframe store wants a keyframe"
        assert stream["keyframes_stored"] == 0

        async def pli_and_keyframes() -> tuple[int, int]:
            (info,) = await daemon.streams(client.session)
            return info["pli_sent"], info["stats"]["keyframes"]

        deadline = time.monotonic() + 30
        while (state := await pli_and_keyframes())[0] < 3:
            assert time.monotonic() < deadline, f"fewer than 3 PLIs sent in time ({state})"
            await asyncio.sleep(0.05)
        plis = state[0]
        # Every PLI makes the sender encode its next frame as a keyframe: one
        # keyframe to start with, plus one per PLI. Without PLIs an aiortc sender
        # makes one or two (the first frame, an encoder reset when the bitrate
        # estimate moves), so this many can only come from answered PLIs.
        while (state := await pli_and_keyframes())[1] < plis + 1:
            assert time.monotonic() < deadline, f"keyframes did not follow the PLIs ({state})"
            await asyncio.sleep(0.05)
        async with daemon.http.get(f"{daemon.url}/metrics") as response:
            text = await response.text()
        sent = next(line for line in text.splitlines() if line.startswith("kfgan_webrtc_pli_sent_total "))
        assert float(sent.split()[1]) >= 1
    finally:
        await client.close()


async def test_stream_admin_stop_hangs_up(daemon: Daemon) -> None:
    client = ClientPeer(PatternTrack())
    try:
        await client.connect(daemon.http, daemon.url)
        await client.wait_frames(5)
        listing = await daemon.get_json("/streams")
        assert [s["id"] for s in listing["sessions"]] == [client.session]
        async with daemon.http.delete(f"{daemon.url}/streams/{client.session}") as response:
            assert response.status == 200
        assert (await daemon.get_json("/streams"))["sessions"] == []
        await wait_for(lambda: client.pc.connectionState in ("closed", "failed") or client._reader.done(), 15,
                       "the client to see the hang-up")
    finally:
        await client.close()


def first_face_pictures(media_dir: Path, count: int) -> tuple[list[DecodedFrame], int]:
    with FileSource(media_dir / "d12.mp4") as source:
        fps = int(round(float(source.frame_rate)))
        pictures = [frame for _, frame in zip(range(count), source)]
    return pictures, fps


@pytest.mark.slow
@pytest.mark.shared
async def test_real_face_is_restored_through_webrtc(media_dir: Path) -> None:
    # Restoration on 2 shared cores takes longer than a live deadline would allow:
    # a generous one lets this check what is restored, not how fast.
    pictures, fps = first_face_pictures(media_dir, 50)
    daemon = await start_daemon(max_latency_ms=2000, pli_interval=0.5)
    client = ClientPeer(ClipTrack(pictures, fps))
    try:
        await client.connect(daemon.http, daemon.url)
        height, width = pictures[0].height, pictures[0].width

        async def restored() -> int:
            (stream,) = await daemon.streams(client.session)
            return stream["stats"]["restored"]

        deadline = time.monotonic() + 60
        while await restored() < 5:
            assert time.monotonic() < deadline, f"no face was restored: {await daemon.streams(client.session)}"
            await asyncio.sleep(0.2)
        (stream,) = await daemon.streams(client.session)
        assert stream["keyframes_stored"] >= 1
        assert {(f.width, f.height) for f in client.frames} == {(width, height)}
    finally:
        await client.close()
        await stop_daemon(daemon)
