"""``kfgan-daemon janus`` in a real conference: Debian's Janus on loopback, aiortc publishers and subscribers.

The daemon (``run_janus``, the same process lifecycle as ``serve``) watches a
VideoRoom configured in Janus's own file, so that the room outlives a Janus
restart as a deployment's does. Publishers send d12 with their frame number
stamped into a corner of the picture, so that a subscriber of the restored
feed and one of the original can be matched frame by frame: the face region
must differ (a generator with strong weights), the corners must not, and the
difference of their arrival times is the latency the daemon adds.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest
import torch
from aiortc import VideoStreamTrack

from janus_support import (
    API_SECRET,
    JanusPublisher,
    JanusServer,
    JanusSubscriber,
    free_port,
    needs_janus,
)
from kfgan_daemon.errors import ConfigError
from kfgan_daemon.janus.api import JanusAuthError, JanusClient, JanusSession, JanusUnreachable
from kfgan_daemon.janus.attachment import run_janus
from kfgan_daemon.janus.videoroom import RoomNotFound, VideoRoom
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.source import FileSource
from kfgan_daemon.model import LiteGenerator
from kfgan_daemon.restore.generator import CropGenerator
from kfgan_daemon.service.config import Settings

ROOM = 4321
STAMP_BITS = 12
STAMP_BLOCK = 16  # pixels per bit: survives two lossy encodes
FPS = 25


def strong_generator(settings: Settings) -> CropGenerator:
    """A real lite generator whose output weights make a plain change to every face it is given."""
    torch.manual_seed(0)
    module = LiteGenerator(channels=8, blocks=1)
    torch.nn.init.normal_(module.tail.weight, std=0.3)
    return CropGenerator(module)


def never_loaded(settings: Settings) -> CropGenerator:
    raise AssertionError("the model was loaded although start-up should have failed first")


class StampedClipTrack(VideoStreamTrack):
    """Plays pictures in a loop at ``FPS`` with the frame number in the top-left corner; keeps each send time."""

    def __init__(self, pictures: list[DecodedFrame]) -> None:
        super().__init__()
        self.pictures = pictures
        self.count = 0
        self.sent_at: dict[int, float] = {}
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        await asyncio.sleep(max(0.0, self._start + self.count / FPS - time.monotonic()))
        picture = self.pictures[self.count % len(self.pictures)]
        y = picture.y.copy()
        stamp(y, self.count)
        frame = picture.with_planes(y, picture.u, picture.v).to_av()
        frame.pts, frame.time_base = self.count * (90000 // FPS), Fraction(1, 90000)
        self.sent_at[self.count % (1 << STAMP_BITS)] = time.monotonic()
        self.count += 1
        return frame


def stamp(y: np.ndarray, number: int) -> None:
    for bit in range(STAMP_BITS):
        value = 235 if number >> bit & 1 else 16
        y[:STAMP_BLOCK, bit * STAMP_BLOCK:(bit + 1) * STAMP_BLOCK] = value


def read_stamp(y: np.ndarray) -> int:
    blocks = y[2:STAMP_BLOCK - 2, : STAMP_BITS * STAMP_BLOCK].reshape(STAMP_BLOCK - 4, STAMP_BITS, STAMP_BLOCK)
    bits = blocks[:, :, 2:-2].mean(axis=(0, 2)) > 125
    return int(sum(1 << n for n, on in enumerate(bits) if on))


def d12_pictures(media_dir: Path, count: int = 50) -> list[DecodedFrame]:
    with FileSource(media_dir / "d12.mp4") as source:
        return [frame for _, frame in zip(range(count), source)]


def janus_settings(server: JanusServer, table: dict | None = None, **overrides) -> Settings:
    table = {
        "url": server.url,
        "api_secret": API_SECRET,
        "rooms": [ROOM],
        "poll_interval": 0.2,
        "reconnect_interval": 0.5,
        **(table or {}),
    }
    # A generous budget on 2 shared cores: this checks what is restored, the bench how fast.
    given = {"port": free_port(), "max_latency_ms": 400, "max_streams": 4, "janus": table, **overrides}
    return Settings.load(None, **given)


class Attached:
    """``run_janus`` in this event loop, with an HTTP client for its status endpoints."""

    def __init__(self, settings: Settings, generator: Callable[[Settings], CropGenerator], signals: bool = False):
        self.settings = settings
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(
            run_janus(settings, stop=self.stop, generator_factory=generator, handle_signals=signals)
        )
        self.url = f"http://127.0.0.1:{settings.port}"
        self.http = aiohttp.ClientSession()

    async def ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert not self.task.done(), f"the daemon stopped: {self.task.exception() if self.task.done() else ''}"
            try:
                async with self.http.get(f"{self.url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError("the daemon never became ready")

    async def publishers(self) -> dict:
        async with self.http.get(f"{self.url}/publishers") as response:
            return await response.json()

    async def entry(self, publisher_id: int) -> dict | None:
        for entry in (await self.publishers())["rooms"][str(ROOM)]:
            if entry["publisher"] == publisher_id:
                return entry
        return None

    async def wait_entry(self, publisher_id: int, state: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = await self.entry(publisher_id)
            if entry is not None and entry["state"] == state:
                return entry
            await asyncio.sleep(0.1)
        raise AssertionError(f"publisher {publisher_id} never became {state}: {await self.publishers()}")

    async def metrics(self) -> str:
        async with self.http.get(f"{self.url}/metrics") as response:
            return await response.text()

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)
        await self.http.close()


async def room_view(janus: JanusServer) -> tuple[JanusClient, JanusSession, VideoRoom]:
    client = JanusClient(janus.url, api_secret=API_SECRET)
    session = await client.create_session()
    return client, session, await VideoRoom.open(session, ROOM)


async def wait_until(condition: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until the (async) condition held."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture
def janus(tmp_path: Path):
    server = JanusServer(tmp_path / "janus", rooms=(ROOM,))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_example_config_is_valid() -> None:
    settings = Settings.load(Path(__file__).resolve().parent.parent / "systemd" / "kfgan-janus.toml")
    assert settings.janus is not None and settings.janus.rooms == [1234]


@needs_janus
async def test_start_up_names_a_wrong_url_secret_or_room(janus: JanusServer) -> None:
    cases = [
        ({"url": f"http://127.0.0.1:{free_port()}/janus"}, JanusUnreachable, "cannot reach Janus"),
        ({"api_secret": "not-the-secret"}, JanusAuthError, "Unauthorized|403"),
        ({"rooms": [999]}, RoomNotFound, "no room 999"),
    ]
    for table, error, message in cases:
        attached = Attached(janus_settings(janus, table), never_loaded)
        started = time.monotonic()
        with pytest.raises(error, match=message):
            await asyncio.wait_for(attached.task, 15)
        assert time.monotonic() - started < 10
        await attached.http.close()
    with pytest.raises(ConfigError, match="janus: the config has no"):
        await run_janus(Settings.load(None, port=free_port()), generator_factory=never_loaded, handle_signals=False)


@needs_janus
@pytest.mark.shared
@pytest.mark.slow
async def test_a_conference_is_restored_through_janus(janus: JanusServer, media_dir: Path, tmp_path: Path) -> None:
    pictures = d12_pictures(media_dir)
    height, width = pictures[0].height, pictures[0].width
    attached = Attached(janus_settings(janus), strong_generator, signals=True)
    client, session, room = await room_view(janus)
    peers: list = []
    try:
        await attached.ready()
        alice_track = StampedClipTrack(pictures)
        alice = JanusPublisher(session, ROOM, "Alice", alice_track)
        peers.append(alice)
        await alice.publish()
        entry = await attached.wait_entry(alice.id, "restored", 30)
        assert entry["restored_display"] == "Alice (restored)"

        # A subscriber of each: matched by the stamped frame number.
        original = JanusSubscriber(session, ROOM, alice.id, keep_luma=True)
        restored = JanusSubscriber(session, ROOM, entry["restored_feed"], keep_luma=True)
        peers += [original, restored]
        await original.subscribe()
        await restored.subscribe()
        await asyncio.sleep(12)
        matched = compare(original.pictures, restored.pictures, alice_track.sent_at)
        entry = await attached.entry(alice.id)
        report = {"matched_frames": matched["frames"], **{k: v for k, v in matched.items() if k != "frames"},
                  "engine": entry["engine"], "keyframes_asked": entry["keyframes_asked"],
                  "keyframes_given": entry["keyframes_given"]}
        (tmp_path / "janus-report.json").write_text(json.dumps(report, indent=1, default=str))
        print("janus conference report:", json.dumps(report, default=str))
        assert set(restored.frames) == {(width, height)}
        assert matched["frames"] >= 100
        # Frame rate: the restored feed keeps the original's.
        assert matched["restored_fps"] >= 0.85 * matched["original_fps"]
        # The face changed, the corners did not (beyond a re-encode).
        assert matched["face_change"] > 4 * matched["corner_change"], matched
        assert matched["corner_psnr_db"] > 35, matched
        assert entry["engine"]["stats"]["restored"] > 0

        # A second publisher joining mid-call is picked up.
        bob = JanusPublisher(session, ROOM, "Bob", StampedClipTrack(pictures[::-1]))
        peers.append(bob)
        await bob.publish()
        await attached.wait_entry(bob.id, "restored", 15)

        # Alice leaving takes her forwarder and restored feed with her, within 2 s.
        await alice.close()
        await alice.handle.detach()
        alice_feed = entry["restored_feed"]

        async def alice_gone() -> bool:
            forwarded = {f.publisher_id for f in await room.forwarders()}
            listed = {p.id for p in await room.participants()}
            return alice.id not in forwarded and alice_feed not in listed

        gone_after = await wait_until(alice_gone, 2.0, "Alice's forwarder and restored feed are removed")
        # Nor does anything of hers stay in the daemon: Bob's is the one engine stream left.
        assert await attached.entry(alice.id) is None
        assert "kfgan_engine_streams_open 1.0" in await attached.metrics()

        # Janus killed and restarted: the daemon reconnects and restores a publisher again within 10 s.
        janus.kill()
        restarted_at = time.monotonic()
        janus.start()
        client2 = JanusClient(janus.url, api_secret=API_SECRET)
        session2 = await client2.create_session()
        carol = JanusPublisher(session2, ROOM, "Carol", StampedClipTrack(pictures))
        peers.append(carol)
        await carol.publish()
        carol_entry = await attached.wait_entry(carol.id, "restored", 10 - (time.monotonic() - restarted_at))
        watcher = JanusSubscriber(session2, ROOM, carol_entry["restored_feed"])
        peers.append(watcher)
        await watcher.subscribe()
        await wait_until(watcher.has_frames, 10 - (time.monotonic() - restarted_at),
                         "the restored feed is back after Janus restarted")
        back_after = time.monotonic() - restarted_at
        metrics = await attached.metrics()
        assert "kfgan_janus_reconnects_total 1.0" in metrics
        assert "kfgan_engine_streams_open 1.0" in metrics  # Bob's feed went with the old Janus; Carol's is new
        print(f"janus: Alice gone after {gone_after:.2f} s; restored feed back {back_after:.1f} s after the restart")

        # SIGTERM: everything the daemon created in Janus is gone before it exits.
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(attached.task, 30)
        room2 = await VideoRoom.open(session2, ROOM)
        assert await room2.forwarders() == []
        assert not [p for p in await room2.participants() if p.display.endswith(" (restored)")]
        await session2.destroy()
        await client2.close()
    finally:
        for peer in peers:
            await peer.close()
        if not attached.task.done():
            await attached.close()
        else:
            await attached.http.close()
        await session.destroy()
        await client.close()


@needs_janus
async def test_more_publishers_than_capacity_wait_and_other_codecs_are_reported(janus: JanusServer) -> None:
    from test_webrtc_loopback import PatternTrack

    attached = Attached(janus_settings(janus, max_streams=1, warmup=False), strong_generator)
    client, session, room = await room_view(janus)
    peers: list = []
    try:
        await attached.ready()
        first = JanusPublisher(session, ROOM, "First", PatternTrack(320, 240))
        second = JanusPublisher(session, ROOM, "Second", PatternTrack(320, 240))
        peers += [first, second]
        await first.publish()
        await attached.wait_entry(first.id, "restored", 15)
        await second.publish()
        await attached.wait_entry(second.id, "waiting_for_capacity", 5)
        assert 'kfgan_janus_publishers{room="4321",state="waiting_for_capacity"} 1.0' in await attached.metrics()
        vp8 = JanusPublisher(session, ROOM, "Vintage", PatternTrack(320, 240), mime_type="video/VP8")
        peers.append(vp8)
        await vp8.publish()
        await attached.wait_entry(vp8.id, "unsupported_codec", 5)
        # A place frees: the one waiting is restored, never half-served before.
        await first.close()
        await first.handle.detach()
        await attached.wait_entry(second.id, "restored", 5)
        restored = [p for p in await room.participants() if p.display.endswith(" (restored)")]
        assert [p.display for p in restored] == ["Second (restored)"]
    finally:
        for peer in peers:
            await peer.close()
        await attached.close()
        await session.destroy()
        await client.close()


def compare(original: list, restored: list, sent_at: dict[int, float]) -> dict:
    """Frames of both feeds matched by their stamp: the change in the face box and in the corners, the
    latency each feed took from the publisher's send to the subscriber's decode, and their frame rates."""
    by_stamp = {read_stamp(y): (at, y) for at, y in original}
    face, corner, added, direct, via_daemon = [], [], [], [], []
    height, width = original[0][1].shape
    box = (slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4))
    size = height // 8
    corners = [(slice(height - size, height), slice(0, size)), (slice(height - size, height), slice(width - size, width)),
               (slice(STAMP_BLOCK + 4, STAMP_BLOCK + 4 + size), slice(width - size, width))]
    for at, y in restored:
        number = read_stamp(y)
        if number not in by_stamp or number not in sent_at:
            continue
        original_at, reference = by_stamp[number]
        difference = np.abs(y.astype(np.float64) - reference)
        face.append(float(difference[box].mean()))
        corner.append(float(np.mean([difference[c].mean() for c in corners])))
        squared = np.mean([((y[c].astype(np.float64) - reference[c]) ** 2).mean() for c in corners])
        corner_psnr = 10 * np.log10(255.0**2 / max(squared, 1e-6))
        added.append(at - original_at)
        direct.append(original_at - sent_at[number])
        via_daemon.append(at - sent_at[number])
    return {
        "frames": len(face),
        "face_change": float(np.median(face)) if face else 0.0,
        "corner_change": float(np.median(corner)) if corner else 0.0,
        "corner_psnr_db": float(corner_psnr) if face else 0.0,
        "added_latency_ms_p50": 1000 * float(np.median(added)) if added else None,
        "added_latency_ms_p95": 1000 * float(np.quantile(added, 0.95)) if added else None,
        "publisher_to_subscriber_ms_p50": {"original": 1000 * float(np.median(direct)) if direct else None,
                                           "restored": 1000 * float(np.median(via_daemon)) if via_daemon else None},
        "original_fps": _rate([at for at, _ in original]),
        "restored_fps": _rate([at for at, _ in restored]),
    }


def _rate(times: list[float]) -> float:
    times = times[len(times) // 4:]  # after the start-up
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
