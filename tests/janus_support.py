"""A real Janus on loopback for the Janus tests, and aiortc peers that publish to and subscribe from its VideoRooms.

:class:`JanusServer` runs Debian's ``/usr/bin/janus`` from a config folder
generated in a tmp dir: only the VideoRoom plugin and the HTTP transport are
loaded, the API is bound to 127.0.0.1 on a free port and needs a secret, and
ICE gathers only on the address aiortc itself uses (aioice skips 127.0.0.1, so
a Janus restricted to loopback would never pair with an aiortc peer).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import pytest
from aioice.ice import get_host_addresses
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from kfgan_daemon.janus.api import JanusHandle, JanusSession
from kfgan_daemon.janus.videoroom import H264_PROFILE, PLUGIN, Forwarder, RemotePublisher, VideoRoom
from kfgan_daemon.media.rtp.packet import RtpPacket
from kfgan_daemon.media.rtp.rtcp import build_pli, build_receiver_report, is_pli

JANUS_BINARY = Path("/usr/bin/janus")
JANUS_LIBS = Path("/usr/lib/x86_64-linux-gnu/janus")
API_SECRET = "kfgan-test-secret"
RELAY_SSRC = 0x4B464741  # "KFGA": the relay's own SSRC in the RTCP it sends

# Applied to each test that needs the binary; a module-level mark keeps the reason in one place.
needs_janus = pytest.mark.skipif(
    not JANUS_BINARY.is_file(), reason=f"Janus is not installed at {JANUS_BINARY} (apt-get install janus)"
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def aiortc_address() -> str:
    """The IPv4 address aioice gathers host candidates on (it never uses 127.0.0.1)."""
    addresses = get_host_addresses(use_ipv4=True, use_ipv6=False)
    if not addresses:
        pytest.skip("no non-loopback IPv4 address: aiortc cannot gather an ICE candidate on this machine")
    return addresses[0]


def _link_only(source: Path, target: Path, names: list[str]) -> None:
    """A folder holding only the named modules: Janus loads every .so in its plugins/transports folders."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target / name).symlink_to(source / name)


@dataclass
class JanusServer:
    """One Janus process; :meth:`restart` keeps its ports so clients see a restarted server, not a new one."""

    folder: Path
    port: int = field(default_factory=free_port)
    api_secret: str = API_SECRET
    rooms: tuple[int, ...] = ()  # configured in the plugin's file: they outlive a restart, as a deployment's do
    debug_level: int = 4  # 5 and up to see each request, the remote publishers' SSRC checks...
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/janus"

    @property
    def log(self) -> Path:
        return self.folder / "janus.log"

    def write_config(self) -> None:
        configs = self.folder / "configs"
        configs.mkdir(parents=True, exist_ok=True)
        _link_only(JANUS_LIBS / "plugins", self.folder / "plugins", ["libjanus_videoroom.so"])
        _link_only(JANUS_LIBS / "transports", self.folder / "transports", ["libjanus_http.so"])
        _link_only(JANUS_LIBS / "events", self.folder / "events", [])
        _link_only(JANUS_LIBS / "loggers", self.folder / "loggers", [])
        (configs / "janus.jcfg").write_text(
            f"""general: {{
    configs_folder = "{configs}"
    plugins_folder = "{self.folder / 'plugins'}"
    transports_folder = "{self.folder / 'transports'}"
    events_folder = "{self.folder / 'events'}"
    loggers_folder = "{self.folder / 'loggers'}"
    debug_level = {self.debug_level}
    api_secret = "{self.api_secret}"
    session_timeout = 60
    protected_folders = []
}}
certificates: {{
}}
media: {{
    ipv6 = false
}}
nat: {{
    nice_debug = false
    ignore_mdns = true
    ice_enforce_list = "{aiortc_address()}"
}}
plugins: {{
}}
transports: {{
}}
loggers: {{
}}
events: {{
}}
"""
        )
        (configs / "janus.transport.http.jcfg").write_text(
            f"""general: {{
    json = "plain"
    base_path = "/janus"
    http = true
    ip = "127.0.0.1"
    port = {self.port}
    https = false
}}
admin: {{
    admin_http = false
}}
cors: {{
}}
"""
        )
        rooms = "".join(
            f'room-{room}: {{\n    description = "room {room}"\n    publishers = 8\n    videocodec = "h264,vp8"\n'
            f'    h264_profile = "{H264_PROFILE}"\n}}\n'
            for room in self.rooms
        )
        (configs / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n" + rooms)

    def start(self, timeout: float = 10.0) -> None:
        configs = self.folder / "configs"
        if not configs.is_dir():
            self.write_config()
        log = self.log.open("ab")
        self.process = subprocess.Popen(
            # --configs-folder as well: Janus 1.1 reads the plugins' configs from /etc/janus without it.
            [str(JANUS_BINARY), "--config", str(configs / "janus.jcfg"), "--configs-folder", str(configs)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._wait_until_listening(timeout)

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"janus exited with {self.process.returncode}; see {self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"janus did not listen on port {self.port} within {timeout:.0f} s; see {self.log}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no session is closed politely."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


def running_janus(folder: Path) -> Iterator[JanusServer]:
    """Fixture body: a started server, stopped afterwards whatever the test did."""
    server = JanusServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def one_codec(transceiver, mime_type: str) -> None:
    """Offer one codec alone (aiortc offers VP8 first otherwise): H.264, as the room and the daemon want."""
    codecs = RTCRtpSender.getCapabilities("video").codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType == mime_type])


@dataclass
class JanusPublisher:
    """An aiortc peer that joins a VideoRoom and publishes one video track, as a browser would."""

    session: JanusSession
    room: int
    display: str
    track: VideoStreamTrack
    mime_type: str = "video/H264"  # the one codec it offers
    id: int | None = None

    async def publish(self, timeout: float = 10.0) -> None:
        self.handle = await self.session.attach(PLUGIN)
        joined = await self.handle.message(
            {"request": "join", "ptype": "publisher", "room": self.room, "display": self.display}
        )
        self.id = joined.data["id"]
        self.pc = RTCPeerConnection()
        one_codec(self.pc.addTransceiver(self.track, direction="sendonly"), self.mime_type)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        offer = {"type": "offer", "sdp": self.pc.localDescription.sdp, "trickle": False}
        reply = await self.handle.message({"request": "publish", "display": self.display}, jsep=offer, timeout=timeout)
        await self.pc.setRemoteDescription(RTCSessionDescription(reply.jsep["sdp"], reply.jsep["type"]))
        await wait_for_event(self.handle, "webrtcup", timeout)

    @property
    def sender(self) -> RTCRtpSender:
        return self.pc.getSenders()[0]

    async def close(self) -> None:
        await self.pc.close()


@dataclass
class JanusSubscriber:
    """An aiortc peer subscribed to one feed of a room; keeps the size of every frame it decodes."""

    session: JanusSession
    room: int
    feed: int
    frames: list[tuple[int, int]] = field(default_factory=list)
    keep_luma: bool = False  # also keep each frame's Y plane and when it was decoded
    pictures: list[tuple[float, np.ndarray]] = field(default_factory=list)

    async def subscribe(self, timeout: float = 10.0) -> None:
        self.handle = await self.session.attach(PLUGIN)
        attached = await self.handle.message(
            {"request": "join", "ptype": "subscriber", "room": self.room, "streams": [{"feed": self.feed}]}
        )
        self.pc = RTCPeerConnection()
        self._readers: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda track: self._readers.append(asyncio.ensure_future(self._read(track))))
        await self.pc.setRemoteDescription(RTCSessionDescription(attached.jsep["sdp"], attached.jsep["type"]))
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        answer = {"type": "answer", "sdp": self.pc.localDescription.sdp, "trickle": False}
        await self.handle.message({"request": "start"}, jsep=answer, timeout=timeout)

    async def has_frames(self) -> bool:
        return bool(self.frames)

    async def _read(self, track) -> None:
        while True:
            try:
                frame: av.VideoFrame = await track.recv()
            except MediaStreamError:
                return
            self.frames.append((frame.width, frame.height))
            if self.keep_luma:
                self.pictures.append((time.monotonic(), frame.to_ndarray(format="yuv420p")[: frame.height].copy()))

    async def close(self) -> None:
        await self.pc.close()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


async def wait_for_event(handle: JanusHandle, name: str, timeout: float) -> dict:
    """Reads the handle's events until a core event ``name`` (``webrtcup``, ``media``...) arrives."""
    deadline = time.monotonic() + timeout
    while True:
        event = await handle.next_event(max(0.01, deadline - time.monotonic()))
        if event.get("janus") == name:
            return event


async def create_room(session: JanusSession, room: int, **settings: object) -> None:
    """A room for one test, H.264 only.

    ``h264_profile`` matters: without it Janus offers a remote publisher's H.264
    with no fmtp (packetization-mode 0), which aiortc subscribers refuse.
    """
    handle = await session.attach(PLUGIN)
    body = {"request": "create", "room": room, "videocodec": "h264", "h264_profile": H264_PROFILE, "publishers": 8}
    try:
        await handle.request({**body, **settings})
    finally:
        await handle.detach()



class Datagrams(asyncio.DatagramProtocol):
    """A UDP socket on 127.0.0.1 that keeps what it receives and can call back on each datagram."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None] | None = None) -> None:
        self.received: list[bytes] = []
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, on_datagram: Callable[[bytes, tuple[str, int]], None] | None = None) -> "Datagrams":
        protocol = cls(on_datagram)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol, local_addr=("127.0.0.1", 0))
        return protocol

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.append(data)
        if self.on_datagram is not None:
            self.on_datagram(data, addr)

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        self.transport.close()


class RestoreRelay:
    """What the daemon does, minus the restoration: a publisher's forwarded RTP goes back in as a remote publisher.

    RTP from the forwarder is re-sent with the remote publisher's SSRC; PLIs
    Janus sends the remote publisher (a subscriber needs a keyframe) go back as
    PLIs through the forwarder's RTCP port to the real publisher.
    """

    def __init__(self, forwarder: Forwarder, remote: RemotePublisher, rtp: Datagrams, rtcp: Datagrams) -> None:
        self.forwarder, self.remote, self.rtp, self.rtcp = forwarder, remote, rtp, rtcp
        self.sent = 0
        self.keyframe_requests = 0

    @classmethod
    async def start(cls, room: VideoRoom, publisher_id: int, mid: str, display: str) -> "RestoreRelay":
        rtp, rtcp = await Datagrams.open(), await Datagrams.open()
        forwarder = await room.rtp_forward(publisher_id, mid, "127.0.0.1", rtp.port, rtcp_port=rtcp.port)
        remote = await room.add_remote_publisher(display)
        relay = cls(forwarder, remote, rtp, rtcp)
        rtp.on_datagram = relay._relay_rtp
        # One socket talks to both Janus RTCP ports; Janus tells them apart by their port.
        rtcp.on_datagram = relay._relay_rtcp
        rtcp.transport.sendto(build_receiver_report(RELAY_SSRC), (remote.host, remote.rtcp_port))
        return relay

    def _relay_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        packet = RtpPacket.parse(data)
        packet.ssrc = self.remote.ssrc
        self.rtp.transport.sendto(packet.serialize(), (self.remote.host, self.remote.port))
        self.sent += 1

    def _relay_rtcp(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[1] == self.remote.rtcp_port and is_pli(data):
            self.keyframe_requests += 1
            target = ("127.0.0.1", self.forwarder.local_rtcp_port)
            self.rtcp.transport.sendto(build_pli(RELAY_SSRC, self.forwarder.ssrc or 0), target)

    def close(self) -> None:
        self.rtp.close()
        self.rtcp.close()

