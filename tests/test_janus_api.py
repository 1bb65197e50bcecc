"""The Janus client and VideoRoom helpers against a real Janus 1.1 on loopback, with real aiortc peers.

Covers the errors a user sees (wrong URL, wrong secret, no such room), the
publisher list, RTP forwarding with keyframe requests through its RTCP port,
remote publishers that subscribers decode, and a Janus restart.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import time
from pathlib import Path

import pytest
from aiortc.rtp import RTCP_PSFB_PLI, RtcpPacket, RtcpPsfbPacket, RtcpRrPacket

from janus_support import (
    API_SECRET,
    RELAY_SSRC,
    Datagrams,
    JanusPublisher,
    JanusServer,
    JanusSubscriber,
    RestoreRelay,
    create_room,
    free_port,
    needs_janus,
    running_janus,
)
from kfgan_daemon.janus.api import JanusAuthError, JanusClient, JanusSessionLost, JanusUnreachable
from kfgan_daemon.janus.videoroom import (
    Publisher,
    PublisherJoined,
    PublisherLeft,
    PublisherNotFound,
    RoomNotFound,
    RoomWatcher,
    VideoRoom,
    restored_display,
)
from kfgan_daemon.media.rtp.packet import RtpPacket
from kfgan_daemon.media.rtp.rtcp import build_pli, build_receiver_report, is_pli
from test_webrtc_loopback import PatternTrack, wait_for

_rooms = itertools.count(1000)
H264_NAL_TYPES = {1, 5, 7, 8, 24, 28}  # slices, parameter sets, STAP-A, FU-A: what aiortc's H.264 sends


@pytest.fixture(scope="module")
def janus(tmp_path_factory: pytest.TempPathFactory):
    yield from running_janus(tmp_path_factory.mktemp("janus"))


@pytest.fixture
async def session(janus: JanusServer):
    async with JanusClient(janus.url, api_secret=API_SECRET) as client:
        session = await client.create_session()
        yield session
        await session.destroy()


@pytest.fixture
async def room(session) -> VideoRoom:
    number = next(_rooms)
    await create_room(session, number)
    videoroom = await VideoRoom.open(session, number)
    yield videoroom
    await videoroom.close()


@pytest.fixture
async def publisher(session, room: VideoRoom):
    alice = JanusPublisher(session, room.room, "Alice", PatternTrack())
    await alice.publish()
    yield alice
    await alice.close()


async def test_wrong_url_is_unreachable_and_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/janus"
    async with JanusClient(url, api_secret=API_SECRET) as client:
        with pytest.raises(JanusUnreachable, match=re.escape(f"cannot reach Janus at {url}")):
            await client.create_session()


@needs_janus
async def test_a_path_that_is_not_the_api_is_unreachable(janus: JanusServer) -> None:
    url = janus.url.replace("/janus", "/nothing")
    async with JanusClient(url, api_secret=API_SECRET) as client:
        with pytest.raises(JanusUnreachable, match=re.escape(f"no Janus API at {url}")):
            await client.create_session()


@needs_janus
async def test_wrong_secret_is_an_auth_error(janus: JanusServer) -> None:
    async with JanusClient(janus.url, api_secret="not-the-secret") as client:
        assert (await client.info())["version"] >= 1100  # server_info needs no secret; 1.1 has remote publishers
        with pytest.raises(JanusAuthError, match="refused the API secret") as raised:
            await client.create_session()
    assert raised.value.code == 403


@needs_janus
async def test_a_missing_room_is_room_not_found(session) -> None:
    with pytest.raises(RoomNotFound, match="no room 424242"):
        await VideoRoom.open(session, 424242)
    with pytest.raises(RoomNotFound, match="no room 424242"):
        await RoomWatcher.join(session, 424242)


@needs_janus
async def test_a_publisher_is_listed_with_its_h264_video(session, room: VideoRoom) -> None:
    watcher = await RoomWatcher.join(session, room.room)
    changes = watcher.changes()
    alice = JanusPublisher(session, room.room, "Alice", PatternTrack())
    await alice.publish()
    try:
        change = await asyncio.wait_for(anext(changes), 5)
        assert isinstance(change, PublisherJoined)
        assert change.publisher.id == alice.id and change.publisher.display == "Alice"
        assert change.publisher.video.codec == "h264"
        assert not room.is_own(change.publisher)
        listed = {p.id: p for p in await room.participants()}
        assert listed[alice.id].publisher and not listed[watcher.id].publisher
    finally:
        await alice.close()
    left: list = []  # looked at now and then, as a polling caller would
    await wait_for(lambda: bool(left.extend(watcher.poll()) or left), 5, "Alice leaving")
    assert left == [PublisherLeft(alice.id)] and alice.id not in watcher.publishers
    await watcher.leave()


@needs_janus
async def test_rtp_forward_delivers_h264_until_stopped(room: VideoRoom, publisher: JanusPublisher) -> None:
    rtp = await Datagrams.open()
    try:
        forwarder = await room.rtp_forward(publisher.id, "0", "127.0.0.1", rtp.port)
        assert [f.stream_id for f in await room.forwarders()] == [forwarder.stream_id]
        await wait_for(lambda: len(rtp.received) >= 20, 5, "20 forwarded RTP packets")
        packets = [RtpPacket.parse(data) for data in rtp.received]
        assert {p.payload[0] & 0x1F for p in packets} <= H264_NAL_TYPES
        assert len({p.payload_type for p in packets}) == 1

        await room.stop_rtp_forward(publisher.id, forwarder.stream_id)
        assert await room.forwarders() == []
        await asyncio.sleep(0.2)  # packets already on their way
        count = len(rtp.received)
        await asyncio.sleep(0.5)
        assert len(rtp.received) == count
    finally:
        rtp.close()
    with pytest.raises(PublisherNotFound):
        await room.rtp_forward(12345, "0", "127.0.0.1", rtp.port)


@needs_janus
async def test_a_pli_on_the_forwarder_rtcp_port_reaches_the_publisher(
    room: VideoRoom, publisher: JanusPublisher
) -> None:
    plis: list[float] = []
    handle_rtcp = publisher.sender._handle_rtcp_packet

    async def spy(packet) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_PLI:
            plis.append(time.monotonic())
        await handle_rtcp(packet)

    publisher.sender._handle_rtcp_packet = spy
    rtp, rtcp = await Datagrams.open(), await Datagrams.open()
    try:
        forwarder = await room.rtp_forward(publisher.id, "0", "127.0.0.1", rtp.port, rtcp_port=rtcp.port)
        # Janus sends first from its local RTCP port: that is the address to answer.
        await wait_for(lambda: bool(rtcp.received), 5, "Janus latching the forwarder's RTCP port")
        await asyncio.sleep(0.5)
        plis.clear()
        rtcp.transport.sendto(build_pli(RELAY_SSRC, forwarder.ssrc or 0), ("127.0.0.1", forwarder.local_rtcp_port))
        await wait_for(lambda: bool(plis), 3, "the PLI at the publisher")
    finally:
        rtp.close()
        rtcp.close()


@needs_janus
async def test_a_remote_publisher_is_decoded_by_subscribers_and_removed(
    session, room: VideoRoom, publisher: JanusPublisher
) -> None:
    watcher = await RoomWatcher.join(session, room.room)
    relay = await RestoreRelay.start(room, publisher.id, "0", restored_display("Alice"))
    subscriber = JanusSubscriber(session, room.room, relay.remote.id)
    try:
        change = await asyncio.wait_for(anext(watcher.changes()), 5)
        restored = change.publisher
        assert restored.display == "Alice (restored)" and restored.video.codec == "h264"
        assert room.is_own(restored)
        assert any(p.id == relay.remote.id and p.remote for p in await room.participants())

        await subscriber.subscribe()
        await wait_for(lambda: len(subscriber.frames) >= 5, 10, "5 frames decoded from the remote publisher")
        assert subscriber.frames[-1] == (320, 240)
        assert relay.keyframe_requests >= 1  # the subscriber's first keyframe came through the relay

        await room.remove_remote_publisher(relay.remote.id)
        assert relay.remote.id not in {p.id for p in await room.participants()}
        assert not room.is_own(Publisher(relay.remote.id, "Bob"))  # the id is forgotten with the feed
        with pytest.raises(PublisherNotFound):
            await room.remove_remote_publisher(relay.remote.id)
    finally:
        await subscriber.close()
        relay.close()
        await watcher.leave()


@needs_janus
async def test_a_restart_loses_the_session_and_a_new_one_works(tmp_path: Path) -> None:
    server = JanusServer(tmp_path)
    server.start()
    try:
        async with JanusClient(server.url, api_secret=API_SECRET) as client:
            session = await client.create_session()
            number = next(_rooms)
            await create_room(session, number)
            room = await VideoRoom.open(session, number)
            server.restart()
            with pytest.raises(JanusSessionLost):
                await room.participants()
            await asyncio.wait_for(session.closed.wait(), 5)
            assert isinstance(session.lost, JanusSessionLost)

            fresh = await client.create_session()
            await create_room(fresh, number)
            assert await (await VideoRoom.open(fresh, number)).participants() == []
            await fresh.destroy()
    finally:
        server.stop()


@needs_janus
async def test_the_event_reader_notices_a_dead_janus(tmp_path: Path) -> None:
    server = JanusServer(tmp_path)
    server.start()
    try:
        async with JanusClient(server.url, api_secret=API_SECRET) as client:
            session = await client.create_session()
            handle = await session.attach("janus.plugin.videoroom")
            server.kill()
            await asyncio.wait_for(session.closed.wait(), 5)
            with pytest.raises(JanusSessionLost, match=re.escape(f"lost Janus at {server.url}")):
                await handle.next_event(1)
    finally:
        server.stop()


def test_pli_and_receiver_report_parse_as_rtcp() -> None:
    (pli,) = RtcpPacket.parse(build_pli(RELAY_SSRC, 1000))
    assert isinstance(pli, RtcpPsfbPacket) and pli.fmt == RTCP_PSFB_PLI
    assert (pli.ssrc, pli.media_ssrc) == (RELAY_SSRC, 1000)
    (report,) = RtcpPacket.parse(build_receiver_report(RELAY_SSRC))
    assert isinstance(report, RtcpRrPacket) and report.ssrc == RELAY_SSRC and report.reports == []
    assert is_pli(build_receiver_report(1) + build_pli(1, 2)) and not is_pli(build_receiver_report(1))
