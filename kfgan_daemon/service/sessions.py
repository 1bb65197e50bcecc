"""WebRTC sessions: one RTCPeerConnection per offer, each incoming video sent back restored.

A video section the caller only receives (``recvonly``) gets the call as the daemon
received it, decoded and unrestored (the n-th such section shows the n-th incoming
video): the demo page shows it beside the restored video.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaBlackhole
from aiortc.sdp import SessionDescription

from kfgan_daemon.engine import Outcome, StreamEngine
from kfgan_daemon.engine.heap import HeapRelease, HeapReleaser
from kfgan_daemon.errors import EngineError, KfganError
from kfgan_daemon.service.capacity import stream_limit
from kfgan_daemon.service.config import Settings
from kfgan_daemon.webrtc import RestoredVideoTrack

log = logging.getLogger(__name__)

# How often a connected session's traffic counters are read to tell a dead caller.
_LIVENESS_INTERVAL = 0.5


class OfferError(KfganError):
    """An offer that cannot be answered; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_offer") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class PeerSession:
    """One peer connection and the restored tracks it sends back."""

    id: str
    pc: RTCPeerConnection
    remote: str | None
    created_at: float = field(default_factory=time.time)
    tracks: list[RestoredVideoTrack] = field(default_factory=list)
    sinks: list[MediaBlackhole] = field(default_factory=list)
    closed: bool = False
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    watch: asyncio.Task[None] | None = None  # connect timeout, then dead-caller detection

    def describe(self) -> dict[str, Any]:
        streams = []
        for track in self.tracks:
            info = track.stream.info().to_dict() if track.stream is not None else {"id": track.stream_id}
            requester = track.keyframe_requester
            info["frames_in"] = track.frames_in
            info["frames_out"] = track.frames_out
            info["frames_out_by_outcome"] = dict(track.outcomes_out)
            info["pli_sent"] = requester.sent if requester is not None else 0
            info["receive_dropped"] = track.frames_dropped_on_receive
            streams.append(info)
        return {
            "id": self.id,
            "remote": self.remote,
            "created_at": self.created_at,
            "connection_state": self.pc.connectionState,
            "codecs": _negotiated_codecs(self.pc),
            "streams": streams,
        }


class SessionManager:
    """Answers offers and owns the resulting peer connections."""

    def __init__(
        self,
        settings: Settings,
        engine_getter: Callable[[], StreamEngine | None],
        *,
        on_keyframe_request: Callable[[], None] | None = None,
        on_frame: Callable[[RestoredVideoTrack, Any, Outcome], None] | None = None,
        on_session_closed: Callable[[PeerSession], None] | None = None,
        on_heap_released: Callable[[HeapRelease], None] | None = None,
    ) -> None:
        self.settings = settings
        self._engine = engine_getter
        self._on_keyframe_request = on_keyframe_request
        self._on_frame = on_frame
        self._on_session_closed = on_session_closed
        self.sessions: dict[str, PeerSession] = {}
        self._accepting = True
        self._background: set[asyncio.Task[Any]] = set()
        self._heap = HeapReleaser(on_heap_released)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self) -> None:
        self._accepting = False

    def _configuration(self) -> RTCConfiguration:
        return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in self.settings.stun_servers])

    async def answer(self, sdp: str, remote: str | None = None) -> tuple[PeerSession, RTCSessionDescription]:
        """Answer one offer; raises :class:`OfferError` with the HTTP status to return."""
        # The caller's mistakes first (400), then whether we can take the call now (503).
        video_sections = _video_sections(sdp)
        if not self._accepting:
            raise OfferError("the daemon is shutting down", status=503, reason="draining")
        engine = self._engine()
        if engine is None or not engine.running:
            raise OfferError("the model is still loading; retry when /readyz says ready", status=503, reason="not_ready")
        if not engine.inference.running:
            raise OfferError(
                "the inference worker is being restarted; retry when /readyz says ready", status=503, reason="not_ready"
            )
        limit = stream_limit(self.settings.max_streams, engine)
        if len(self.sessions) >= limit:
            raise OfferError(f"{limit} streams are live already (max_streams)", status=503, reason="capacity")
        if video_sections > limit - len(self.sessions):
            raise OfferError(
                f"the offer has {video_sections} video tracks, more than the {limit} streams allowed",
                status=503, reason="capacity",
            )

        session = PeerSession(id=self._new_id(), pc=RTCPeerConnection(self._configuration()), remote=remote)
        self.sessions[session.id] = session
        failures: list[Exception] = []

        @session.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind != "video":
                # Nobody reads it otherwise, and aiortc's receive queue is unbounded.
                sink = MediaBlackhole()
                sink.addTrack(track)
                session.sinks.append(sink)
                self._spawn(sink.start())
                return
            try:
                restored = self._restored_track(session, track, engine)
            except EngineError as exc:
                failures.append(exc)
                return
            session.tracks.append(restored)
            # Back on the track's own section, whichever order the offer lists its sections in.
            _send_on(_transceiver_of(session.pc, track), restored, "sendrecv")

        @session.pc.on("connectionstatechange")
        async def on_state() -> None:
            state = session.pc.connectionState
            log.info("session %s: connection %s", session.id, state)
            if state == "connected":
                session.connected.set()
            elif state in ("failed", "closed"):
                await self.close(session.id)

        try:
            await session.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if failures:
                raise OfferError(str(failures[0]), status=503, reason="capacity")
            _send_received_views(session, sdp)
            answer = await session.pc.createAnswer()
            await session.pc.setLocalDescription(answer)
        except OfferError:
            await self.close(session.id)
            raise
        except Exception as exc:  # aiortc raises ValueError, AssertionError, ... on bad SDP
            await self.close(session.id)
            raise OfferError(f"the offer's SDP was rejected: {_describe(exc)}", reason="bad_sdp") from None
        session.watch = self._spawn(self._watch(session))
        log.info("session %s: answered offer from %s with %d video track(s)", session.id, remote, len(session.tracks))
        return session, session.pc.localDescription

    def _new_id(self) -> str:
        """``<instance_id>.<random>``: a balancer routes follow-up requests by the prefix, and the random part
        keeps a restarted instance (same id) from reusing a session id an old caller may still send."""
        while True:
            session_id = f"{self.settings.instance_id}.{secrets.token_urlsafe(6)}"
            if session_id not in self.sessions:
                return session_id

    def _restored_track(self, session: PeerSession, track: MediaStreamTrack, engine: StreamEngine) -> RestoredVideoTrack:
        receiver = _receiver_of(session.pc, track)
        restored = RestoredVideoTrack(
            track,
            engine,
            stream_id=f"{session.id}-v{len(session.tracks) + 1}",
            policy=self.settings.overload_policy,
            restore_settings=self.settings.restore_settings(),
            receiver=receiver,
            pli_interval=self.settings.pli_interval,
            on_keyframe_request=self._on_keyframe_request,
            on_frame=None if self._on_frame is None else (lambda frame, outcome: self._on_frame(restored, frame, outcome)),
        )
        restored.open()
        return restored

    async def close(self, session_id: str, drain: bool = False, timeout: float | None = None) -> bool:
        """Close a session; False when there is none with this id."""
        session = self.sessions.pop(session_id, None)
        if session is None or session.closed:
            return False
        session.closed = True
        if session.watch is not None and session.watch is not asyncio.current_task():
            session.watch.cancel()
        try:
            await asyncio.gather(*(track.aclose(drain=drain, timeout=timeout) for track in session.tracks),
                                 return_exceptions=True)
            await asyncio.gather(*(sink.stop() for sink in session.sinks), return_exceptions=True)
            await session.pc.close()
            if self._on_session_closed is not None:
                self._on_session_closed(session)
        finally:
            # The event handlers close over the session and the session holds the peer
            # connection: without this cycle everything (codecs and their threads included)
            # is freed as soon as the last reference goes, not at some later gc.
            _unhook(session.pc)
            for track in session.tracks:
                track.remove_all_listeners()
            session.tracks.clear()
            session.sinks.clear()
            session.watch = None
        self._heap.schedule()
        log.info("session %s: closed", session.id)
        return True

    async def close_all(self, drain: bool = True, timeout: float | None = None) -> None:
        """Close every session; with ``drain``, frames already in the engine are still sent first."""
        await asyncio.gather(*(self.close(sid, drain=drain, timeout=timeout) for sid in list(self.sessions)),
                             return_exceptions=True)
        await self._heap.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _watch(self, session: PeerSession) -> None:
        """Free the slot of a caller that never connects, or that stops sending anything once connected.

        A killed caller says nothing: ICE consent would only expire after 30 s.
        Every datagram of the session (media, RTCP, DTLS) is counted by the
        transport, and a connected caller sends RTCP reports every second or so
        even without media, so ``media_timeout`` seconds without any is a dead caller.
        """
        connect_timeout = self.settings.connect_timeout
        try:
            await asyncio.wait_for(session.connected.wait(), connect_timeout)
        except TimeoutError:
            log.warning("session %s: not connected %.1f s after its offer was answered, closing it",
                        session.id, connect_timeout)
            await self.close(session.id)
            return
        loop = asyncio.get_running_loop()
        timeout = self.settings.media_timeout
        interval = min(_LIVENESS_INTERVAL, timeout / 4)
        received, since = -1, loop.time()
        while not session.closed:
            await asyncio.sleep(interval)
            count = await _datagrams_received(session.pc)
            now = loop.time()
            if count != received:
                received, since = count, now
            elif now - since >= timeout:
                log.warning("session %s: nothing received from the caller for %.1f s, hanging up",
                            session.id, now - since)
                await self.close(session.id)
                return

    def _spawn(self, coro) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


def _video_sections(sdp: str) -> int:
    """Count the offer's video sections the caller sends (each is a stream to restore), rejecting text that
    is not an SDP offer at all."""
    if not sdp.lstrip().startswith("v=0"):
        raise OfferError("the offer's SDP must start with v=0", reason="bad_sdp")
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:
        raise OfferError(f"the offer's SDP cannot be parsed: {_describe(exc)}", reason="bad_sdp") from None
    count = sum(1 for media in description.media if media.kind == "video" and _caller_sends(media.direction))
    if count == 0:
        raise OfferError("the offer sends no video; send at least one video track", reason="no_video")
    return count


# Directions of an offer's section in which the caller sends media.
_CALLER_SENDS = ("sendrecv", "sendonly")


def _caller_sends(direction: str | None) -> bool:
    """A section without a direction attribute is sendrecv (RFC 4566, section 6)."""
    return direction is None or direction in _CALLER_SENDS


def _send_received_views(session: PeerSession, sdp: str) -> None:
    """Send each restored track's received view on a video section the caller only receives, in offer order."""
    description = SessionDescription.parse(sdp)
    receive_only = {
        media.rtp.muxId for media in description.media if media.kind == "video" and media.direction == "recvonly"
    }
    free = [t for t in session.pc.getTransceivers() if t.mid in receive_only and t.sender.track is None]
    for transceiver, restored in zip(free, session.tracks):
        _send_on(transceiver, restored.received_view(), "sendonly")


def _send_on(transceiver: RTCRtpTransceiver, track: MediaStreamTrack, direction: str) -> None:
    transceiver.sender.replaceTrack(track)
    transceiver.direction = direction


def _transceiver_of(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpTransceiver:
    return next(t for t in pc.getTransceivers() if t.receiver.track is track)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _datagrams_received(pc: RTCPeerConnection) -> int:
    """Datagrams (media, RTCP, DTLS) the peer connection's transports have received so far."""
    report = await pc.getStats()
    return sum(getattr(stats, "packetsReceived", 0) for stats in report.values() if stats.type == "transport")


def _unhook(pc: RTCPeerConnection) -> None:
    """Drop every event listener of a closed peer connection and of its transports.

    aiortc registers the connection's own bound methods on its ICE and DTLS
    transports (state changes) and clears only the connection's listeners on
    close, so each closed connection stays alive in a reference cycle, with
    its codecs and their threads, until the garbage collector happens to run.
    """
    pc.remove_all_listeners()
    transports = {pc.sctp.transport} if pc.sctp is not None else set()
    for transceiver in pc.getTransceivers():
        transports |= {transceiver.sender.transport, transceiver.receiver.transport}
    for dtls in transports - {None}:
        dtls.remove_all_listeners()
        dtls.transport.remove_all_listeners()
        dtls.transport.iceGatherer.remove_all_listeners()


def _receiver_of(pc: RTCPeerConnection, track: MediaStreamTrack) -> RTCRtpReceiver | None:
    for transceiver in pc.getTransceivers():
        if transceiver.receiver.track is track:
            return transceiver.receiver
    return None


def _negotiated_codecs(pc: RTCPeerConnection) -> list[str]:
    """The codec each video section was answered with (the first one listed in our answer)."""
    if pc.localDescription is None:
        return []
    description = SessionDescription.parse(pc.localDescription.sdp)
    return [media.rtp.codecs[0].mimeType for media in description.media if media.kind == "video" and media.rtp.codecs]
