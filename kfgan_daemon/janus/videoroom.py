"""VideoRoom administration for the daemon: who publishes what, RTP forwarders out, remote publishers in.

The daemon takes each publisher's video out of a room with ``rtp_forward``
(plain RTP to a UDP port of its own, with an RTCP port through which its PLIs
reach the publisher) and puts the restored video back as a *remote publisher*
(Janus 1.1+), which subscribers pick like any other. Its own remote publishers
are in the room too: :meth:`VideoRoom.is_own` tells them apart, so the daemon
never restores its own output.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kfgan_daemon.janus.api import JanusHandle, JanusPluginError, JanusSession

log = logging.getLogger(__name__)

PLUGIN = "janus.plugin.videoroom"
RESTORED_SUFFIX = " (restored)"

# VideoRoom error codes (janus_videoroom.c) the helpers turn into their own errors.
NO_SUCH_ROOM = 426
NO_SUCH_FEED = 428

# A remote publisher tells its streams apart by SSRC: stream ``mindex`` arrives as
# REMOTE_BASE_SSRC + mindex * REMOTE_SSRC_STEP (the next SSRCs are simulcast layers),
# the numbering a source Janus uses for publish_remotely. Janus 1.1.2 drops packets with any
# other SSRC ("Invalid mindex" in its log); the payload type is rewritten for each subscriber.
REMOTE_BASE_SSRC = 1000
REMOTE_SSRC_STEP = 10
# The profile the restored H.264 is encoded in: constrained baseline 3.1, what browsers all decode.
H264_PROFILE = "42e01f"


class RoomNotFound(JanusPluginError, LookupError):
    """The VideoRoom has no room with this id."""


class PublisherNotFound(JanusPluginError, LookupError):
    """The room has no publisher (or remote publisher) with this id."""


def restored_display(display: str, suffix: str = RESTORED_SUFFIX) -> str:
    """The name the restored feed of ``display`` is shown under."""
    return f"{display}{suffix}"


@dataclass(frozen=True, slots=True)
class PublisherStream:
    mid: str
    type: str  # "audio" | "video" | "data"
    mindex: int
    codec: str | None = None  # "h264", "vp8"...; None while disabled
    disabled: bool = False

    @classmethod
    def from_janus(cls, stream: dict[str, Any]) -> "PublisherStream":
        return cls(
            mid=str(stream["mid"]),
            type=stream["type"],
            mindex=int(stream.get("mindex", 0)),
            codec=stream.get("codec"),
            disabled=bool(stream.get("disabled", False)),
        )


@dataclass(frozen=True, slots=True)
class Publisher:
    """An active publisher as the room announces it (local or remote)."""

    id: int
    display: str
    streams: tuple[PublisherStream, ...] = ()

    @classmethod
    def from_janus(cls, publisher: dict[str, Any]) -> "Publisher":
        streams = tuple(PublisherStream.from_janus(s) for s in publisher.get("streams", []))
        return cls(id=int(publisher["id"]), display=publisher.get("display", ""), streams=streams)

    @property
    def video(self) -> PublisherStream | None:
        """The first enabled video stream: the one the daemon restores."""
        return next((s for s in self.streams if s.type == "video" and not s.disabled), None)


@dataclass(frozen=True, slots=True)
class Participant:
    """A ``listparticipants`` entry: anyone joined, publishing or not."""

    id: int
    display: str
    publisher: bool
    remote: bool = False


@dataclass(frozen=True, slots=True)
class Forwarder:
    """One RTP forwarder of one publisher stream.

    With an RTCP port, a PLI sent from that port to ``local_rtcp_port`` on the
    Janus host becomes a keyframe request to the publisher.
    """

    stream_id: int
    publisher_id: int
    type: str
    host: str
    port: int
    local_rtcp_port: int | None = None
    remote_rtcp_port: int | None = None
    ssrc: int | None = None
    payload_type: int | None = None

    @classmethod
    def from_janus(cls, publisher_id: int, forwarder: dict[str, Any]) -> "Forwarder":
        return cls(
            stream_id=int(forwarder["stream_id"]),
            publisher_id=publisher_id,
            type=forwarder.get("type", ""),
            host=forwarder.get("host", ""),
            port=int(forwarder.get("port", 0)),
            local_rtcp_port=forwarder.get("local_rtcp_port"),
            remote_rtcp_port=forwarder.get("remote_rtcp_port"),
            ssrc=forwarder.get("ssrc"),
            payload_type=forwarder.get("pt"),
        )


@dataclass(frozen=True, slots=True)
class RemotePublisher:
    """Where to send a remote publisher's RTP: ``host:port``, SSRC ``ssrc``, H.264 with any dynamic payload type.

    Janus sends its keyframe requests (PLI) for this feed to whichever address
    last sent a packet to ``host:rtcp_port``: send one there to be asked for keyframes.
    """

    id: int
    room: int
    display: str
    host: str
    port: int
    rtcp_port: int
    mid: str = "0"
    ssrc: int = REMOTE_BASE_SSRC


@dataclass(frozen=True, slots=True)
class PublisherJoined:
    publisher: Publisher


@dataclass(frozen=True, slots=True)
class PublisherLeft:
    publisher_id: int


@dataclass
class VideoRoom:
    """The requests the daemon makes on one room, through one handle of its session."""

    handle: JanusHandle
    room: int
    secret: str | None = None  # the room's secret, needed for remote publishers and listforwarders when set
    admin_key: str | None = None  # the plugin's admin_key, needed for rtp_forward when locked
    restored_suffix: str = RESTORED_SUFFIX
    own_ids: set[int] = field(default_factory=set)

    @classmethod
    async def open(
        cls,
        session: JanusSession,
        room: int,
        secret: str | None = None,
        admin_key: str | None = None,
        restored_suffix: str = RESTORED_SUFFIX,
    ) -> "VideoRoom":
        """Attaches a handle and checks the room exists (:class:`RoomNotFound` otherwise)."""
        handle = await session.attach(PLUGIN)
        videoroom = cls(handle, room, secret, admin_key, restored_suffix)
        try:
            exists = await handle.request({"request": "exists", "room": room})
            if not exists.get("exists"):
                raise RoomNotFound(f"Janus VideoRoom has no room {room}", NO_SUCH_ROOM, f"No such room ({room})")
        except BaseException:
            await handle.detach()
            raise
        return videoroom

    async def close(self) -> None:
        await self.handle.detach()

    def is_own(self, publisher: Publisher | Participant) -> bool:
        """Whether this is a feed the daemon publishes (never to be restored again)."""
        return publisher.id in self.own_ids or publisher.display.endswith(self.restored_suffix)

    async def participants(self) -> list[Participant]:
        data = await self._request({"request": "listparticipants"})
        return [
            Participant(int(p["id"]), p.get("display", ""), bool(p.get("publisher")), bool(p.get("remote", False)))
            for p in data.get("participants", [])
        ]

    async def rtp_forward(
        self,
        publisher_id: int,
        mid: str,
        host: str,
        port: int,
        rtcp_port: int | None = None,
        ssrc: int | None = None,
        payload_type: int | None = None,
    ) -> Forwarder:
        """Forwards one stream of a publisher as plain RTP to ``host:port``.

        With ``rtcp_port``, Janus sends from its ``local_rtcp_port`` to
        ``host:rtcp_port`` and turns PLI/FIR it gets back there into keyframe
        requests to the publisher (it relays nothing else).
        """
        stream: dict[str, Any] = {"mid": mid, "port": port}
        for key, value in (("rtcp_port", rtcp_port), ("ssrc", ssrc), ("pt", payload_type)):
            if value is not None:
                stream[key] = value
        data = await self._request(
            {"request": "rtp_forward", "publisher_id": publisher_id, "host": host, "streams": [stream]},
            publisher_id,
        )
        forwarders = data.get("forwarders", [])
        if not forwarders:
            raise PublisherNotFound(f"publisher {publisher_id} in room {self.room} has no stream with mid {mid!r}")
        return Forwarder.from_janus(publisher_id, forwarders[0])

    async def stop_rtp_forward(self, publisher_id: int, stream_id: int) -> None:
        await self._request(
            {"request": "stop_rtp_forward", "publisher_id": publisher_id, "stream_id": stream_id}, publisher_id
        )

    async def forwarders(self) -> list[Forwarder]:
        data = await self._request({"request": "listforwarders"})
        return [
            Forwarder.from_janus(int(p["publisher_id"]), f)
            for p in data.get("publishers", [])
            for f in p.get("forwarders", [])
        ]

    async def add_remote_publisher(self, display: str, iface: str = "127.0.0.1", port: int = 0) -> RemotePublisher:
        """A new feed of one H.264 video stream whose RTP the caller sends to the returned host and port.

        ``iface`` is where Janus listens for it (an address of the Janus host);
        ``port`` 0 lets Janus pick a free one.
        """
        stream = {"type": "video", "mindex": 0, "mid": "0", "codec": "h264", "h264-profile": H264_PROFILE}
        data = await self._request(
            {"request": "add_remote_publisher", "display": display, "iface": iface, "port": port, "streams": [stream]}
        )
        publisher_id = int(data["id"])
        self.own_ids.add(publisher_id)
        return RemotePublisher(
            id=publisher_id,
            room=self.room,
            display=display,
            host=data["ip"],
            port=int(data["port"]),
            rtcp_port=int(data["rtcp_port"]),
        )

    async def remove_remote_publisher(self, publisher_id: int) -> None:
        try:
            await self._request({"request": "remove_remote_publisher", "id": publisher_id}, publisher_id)
        finally:
            self.own_ids.discard(publisher_id)

    async def _request(self, body: dict[str, Any], publisher_id: int | None = None) -> dict[str, Any]:
        """A synchronous request on this room, with its credentials, and the room's errors made specific."""
        body = {**body, "room": self.room}
        if self.secret:
            body["secret"] = self.secret
        if self.admin_key:
            body["admin_key"] = self.admin_key
        try:
            return await self.handle.request(body)
        except JanusPluginError as error:
            if error.code == NO_SUCH_ROOM:
                raise RoomNotFound(f"Janus VideoRoom has no room {self.room}", error.code, error.reason) from None
            if error.code == NO_SUCH_FEED and publisher_id is not None:
                raise PublisherNotFound(
                    f"room {self.room} has no publisher {publisher_id}: {error.reason}", error.code, error.reason
                ) from None
            raise


class RoomWatcher:
    """Follows a room's active publishers through the events of a passive participant (joined, never publishing).

    ``listparticipants`` says who publishes but not what (mids, codecs); the
    ``joined`` answer and the ``publishers`` / ``unpublished`` / ``leaving``
    events a participant gets do, and arrive as they happen.
    """

    def __init__(self, handle: JanusHandle, room: int, display: str = "kfgan-daemon") -> None:
        self.handle = handle
        self.room = room
        self.display = display
        self.id: int | None = None
        self.publishers: dict[int, Publisher] = {}

    @classmethod
    async def join(cls, session: JanusSession, room: int, display: str = "kfgan-daemon") -> "RoomWatcher":
        """Joins the room; :attr:`publishers` then holds everyone publishing already."""
        handle = await session.attach(PLUGIN)
        watcher = cls(handle, room, display)
        try:
            reply = await handle.message({"request": "join", "ptype": "publisher", "room": room, "display": display})
        except JanusPluginError as error:
            await handle.detach()
            if error.code == NO_SUCH_ROOM:
                raise RoomNotFound(f"Janus VideoRoom has no room {room}", error.code, error.reason) from None
            raise
        except BaseException:
            await handle.detach()
            raise
        watcher.id = reply.data["id"]
        for publisher in reply.data.get("publishers", []):
            watcher._apply_joined(Publisher.from_janus(publisher))
        return watcher

    def poll(self) -> list[PublisherJoined | PublisherLeft]:
        """The changes since the last look, without waiting; :attr:`publishers` is current afterwards."""
        changes: list[PublisherJoined | PublisherLeft] = []
        for event in self.handle.pending_events():
            changes.extend(self._changes(event.get("plugindata", {}).get("data", {})))
        return changes

    async def changes(self) -> AsyncIterator[PublisherJoined | PublisherLeft]:
        """Publishers as they come (or renegotiate: a new :class:`PublisherJoined`) and go.

        Ends with :class:`~kfgan_daemon.janus.api.JanusSessionLost` when the session is lost.
        """
        while True:
            event = await self.handle.next_event()
            data = event.get("plugindata", {}).get("data", {})
            for change in self._changes(data):
                yield change

    def _changes(self, data: dict[str, Any]) -> list[PublisherJoined | PublisherLeft]:
        changes: list[PublisherJoined | PublisherLeft] = []
        for publisher in data.get("publishers", []):
            changes.append(self._apply_joined(Publisher.from_janus(publisher)))
        for key in ("unpublished", "leaving", "kicked"):
            gone = data.get(key)
            if isinstance(gone, int) and self.publishers.pop(gone, None) is not None:
                changes.append(PublisherLeft(gone))
        return changes

    def _apply_joined(self, publisher: Publisher) -> PublisherJoined:
        self.publishers[publisher.id] = publisher
        return PublisherJoined(publisher)

    async def leave(self) -> None:
        try:
            await self.handle.message({"request": "leave"})
        finally:
            await self.handle.detach()
