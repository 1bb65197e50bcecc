"""One publisher of a VideoRoom restored: its forwarded RTP in, a remote publisher's RTP back, RTCP both ways.

    publisher ──WebRTC──► Janus ──rtp_forward──► RtpPipe (engine stream) ──RTP, SSRC 1000──► Janus ──► subscribers
                            ▲     (RTCP: PLI ◄─── the store needs an I-frame)         ◄── PLI: a subscriber needs an IDR
                            └─────────────────────── one RTCP socket per feed ────────────────┘

A :class:`RestoredFeed` creates what it needs in Janus in an order that leaves
nothing behind when a step fails (the remote publisher, then the pipe's socket,
then the forwarder to it), and removes it in the reverse order.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from kfgan_daemon.janus.api import JanusError
from kfgan_daemon.janus.videoroom import Forwarder, Publisher, RemotePublisher, VideoRoom, restored_display
from kfgan_daemon.media.rtp.rtcp import build_pli, build_receiver_report, is_pli
from kfgan_daemon.media.rtp.sdp import H264SessionDescription
from kfgan_daemon.rtpapps.pipe import PipeHooks, PipeOptions, RtpPipe

if TYPE_CHECKING:
    from kfgan_daemon.engine.engine import StreamEngine
    from kfgan_daemon.restore import RestoreSettings

log = logging.getLogger(__name__)

# The payload type the forwarder is asked to use: the one the pipe's SDP says.
FORWARDED_PAYLOAD_TYPE = 96
# The SSRC of the daemon's own RTCP (its PLIs and the receiver report that opens the path).
DAEMON_RTCP_SSRC = 0x4B464741  # "KFGA"


@dataclass(slots=True)
class FeedCounts:
    """The keyframes one feed asked for and gave, for its metrics and ``/publishers`` (the frames it sent
    are its pipe's count)."""

    keyframes_asked: int = 0  # PLIs sent to the publisher for the keyframe store
    keyframes_given: int = 0  # IDRs sent because a subscriber asked (Janus's PLI)


class FeedRtcp(asyncio.DatagramProtocol):
    """The feed's one RTCP socket: PLIs to the publisher through the forwarder, PLIs from subscribers in.

    Janus sends the forwarder's RTCP from its ``local_rtcp_port`` to this socket
    and relays a PLI sent back there to the publisher; and it sends a remote
    publisher's keyframe requests to whichever address last sent to that
    publisher's ``rtcp_port``, so one receiver report from here opens that path.
    """

    def __init__(self, janus_host: str, min_interval: float) -> None:
        self.janus_host = janus_host
        self.min_interval = min_interval
        self.transport: asyncio.DatagramTransport | None = None
        self.forwarder: Forwarder | None = None
        self.remote: RemotePublisher | None = None
        self.on_subscriber_pli: Callable[[], None] | None = None
        self._last_pli: float | None = None

    @classmethod
    async def open(cls, host: str, janus_host: str, min_interval: float) -> "FeedRtcp":
        protocol = cls(janus_host, min_interval)
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol, local_addr=(host, 0))
        return protocol

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        remote = self.remote
        if remote is not None and addr[1] == remote.rtcp_port and is_pli(data) and self.on_subscriber_pli is not None:
            self.on_subscriber_pli()

    def open_subscriber_path(self) -> None:
        """Tell Janus where the remote publisher's keyframe requests go: here."""
        if self.transport is not None and self.remote is not None:
            self.transport.sendto(build_receiver_report(DAEMON_RTCP_SSRC), (self.remote.host, self.remote.rtcp_port))

    def ask_publisher_for_keyframe(self) -> bool:
        """A PLI to the publisher, at most one per ``min_interval`` (a keyframe costs the call a burst of bits)."""
        forwarder = self.forwarder
        now = time.monotonic()
        if (self.transport is None or forwarder is None or forwarder.local_rtcp_port is None
                or (self._last_pli is not None and now - self._last_pli < self.min_interval)):
            return False
        self._last_pli = now
        self.transport.sendto(build_pli(DAEMON_RTCP_SSRC, forwarder.ssrc or 0),
                              (self.janus_host, forwarder.local_rtcp_port))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class RestoredFeed:
    """One publisher's video restored and published back into its room as ``"<display><suffix>"``."""

    def __init__(
        self,
        room: VideoRoom,
        publisher: Publisher,
        options: PipeOptions,
        *,
        forward_host: str,
        publish_iface: str,
        janus_host: str,
        keyframe_interval: float,
        restore_settings: "RestoreSettings | None" = None,
    ) -> None:
        self.room = room
        self.publisher = publisher
        self.options = options
        self.forward_host = forward_host
        self.publish_iface = publish_iface
        self.janus_host = janus_host
        self.keyframe_interval = keyframe_interval
        self.restore_settings = restore_settings
        self.counts = FeedCounts()
        self.stream_id = f"janus-{room.room}-{publisher.id}"
        self.pipe: RtpPipe | None = None
        self.forwarder: Forwarder | None = None
        self.remote: RemotePublisher | None = None
        self.rtcp: FeedRtcp | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def display(self) -> str:
        return restored_display(self.publisher.display, self.room.restored_suffix)

    async def open(self, engine: "StreamEngine") -> None:
        """Create the remote publisher, the pipe and the forwarder; on any failure, remove what was made."""
        video = self.publisher.video
        assert video is not None
        try:
            self.rtcp = await FeedRtcp.open(self.forward_host, self.janus_host, self.keyframe_interval)
            self.remote = await self.room.add_remote_publisher(self.display, iface=self.publish_iface)
            self.rtcp.remote = self.remote
            self.rtcp.on_subscriber_pli = self._subscriber_needs_keyframe
            description = H264SessionDescription(
                address=self.forward_host, port=0, payload_type=FORWARDED_PAYLOAD_TYPE,
                session_name=f"janus room {self.room.room} publisher {self.publisher.id}",
            )
            self.pipe = RtpPipe(
                description,
                f"rtp://{self.remote.host}:{self.remote.port}",
                replace(self.options, output_ssrc=self.remote.ssrc),  # Janus takes a remote feed's RTP by its SSRC
                stream_id=self.stream_id,
                restore_settings=self.restore_settings,
                hooks=PipeHooks(on_keyframe_needed=self._store_needs_keyframe),
            )
            await self.pipe.open(engine)
            self.forwarder = await self.room.rtp_forward(
                self.publisher.id, video.mid, self.forward_host, self.pipe.receiver.port,
                rtcp_port=self.rtcp.port, payload_type=FORWARDED_PAYLOAD_TYPE,
            )
            self.rtcp.forwarder = self.forwarder
            self.rtcp.open_subscriber_path()
        except BaseException:
            await self.close(remove=True)
            raise
        self.task = asyncio.create_task(self.pipe.run(), name=f"kfgan-{self.stream_id}")
        log.info("janus: restoring %r (publisher %d, room %d) as %r", self.publisher.display, self.publisher.id,
                 self.room.room, self.display)

    async def finish(self) -> None:
        """Stop the forwarder, let the frames already in the pipe out, then withdraw the restored feed."""
        await self._stop_forwarding()
        if self.pipe is not None:
            await self.pipe.finish()

    async def close(self, remove: bool) -> None:
        """Release the feed; with ``remove``, also what it created in Janus (not after Janus restarted: gone)."""
        if remove:
            await self._stop_forwarding()
            await self._remove_remote_publisher()
        else:
            self.forwarder = self.remote = None
        if self.pipe is not None:
            await self.pipe.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        if self.rtcp is not None:
            self.rtcp.close()

    def describe(self) -> dict[str, object]:
        """This feed for ``/publishers``: its restored feed in the room, its counts, its engine stream and receiver."""
        pipe = self.pipe
        return {
            "display": self.publisher.display,
            "restored_feed": self.remote.id if self.remote is not None else None,
            "restored_display": self.display,
            "frames_sent": pipe.frames_sent if pipe is not None else 0,
            "keyframes_asked": self.counts.keyframes_asked,
            "keyframes_given": self.counts.keyframes_given,
            "engine": pipe.stream.info().to_dict() if pipe is not None and pipe.stream is not None else None,
            "receiver": asdict(pipe.receiver.stats) if pipe is not None else None,
        }

    def _store_needs_keyframe(self) -> None:
        if self.rtcp is not None and self.rtcp.ask_publisher_for_keyframe():
            self.counts.keyframes_asked += 1

    def _subscriber_needs_keyframe(self) -> None:
        if self.pipe is not None:
            self.pipe.request_output_keyframe()
            self.counts.keyframes_given += 1

    async def _stop_forwarding(self) -> None:
        forwarder, self.forwarder = self.forwarder, None
        if forwarder is None:
            return
        try:
            await self.room.stop_rtp_forward(forwarder.publisher_id, forwarder.stream_id)
        except JanusError as exc:
            # A publisher that left took its forwarders with it.
            log.debug("janus: stopping forwarder %d of %d: %s", forwarder.stream_id, forwarder.publisher_id, exc)

    async def _remove_remote_publisher(self) -> None:
        remote, self.remote = self.remote, None
        if remote is None:
            return
        try:
            await self.room.remove_remote_publisher(remote.id)
        except JanusError as exc:
            log.warning("janus: removing the restored feed %r (%d) from room %d: %s", remote.display, remote.id,
                        self.room.room, exc)
