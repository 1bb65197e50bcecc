"""A track transformer for aiortc: wrap a remote video track, get a track of restored frames.

Usage in any aiortc application::

    @pc.on("track")
    def on_track(track):
        if track.kind == "video":
            receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
            pc.addTrack(RestoredVideoTrack(track, engine, receiver=receiver))

A reader task takes each picture off the remote track as soon as it arrives
(aiortc's receive queue is unbounded) into a backlog of at most a couple of
frames, where under overload the newest win and I-frames stay; a pump task tags
each picture's I-frame flag and submits it to a real-time engine stream. ``recv()`` returns the
engine's output in order, with the input's pts and time base; frames the engine
could not restore in time come out unrestored or not at all, by the stream's
overload policy. When the stream's keyframe store is empty or far from the
current pose, the sender is asked for a new keyframe with an RTCP PLI.
:meth:`RestoredVideoTrack.received_view` is a second track of the same frames as they
arrived, decoded and unrestored, for showing the two side by side.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

import av
from aiortc import MediaStreamTrack, RTCRtpReceiver
from aiortc.mediastreams import MediaStreamError

from kfgan_daemon.engine import FrameRestorer, LiveStream, Outcome, StreamEngine, StreamOutput
from kfgan_daemon.engine.settings import OverloadPolicy
from kfgan_daemon.errors import StreamClosedError
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame, is_intra_picture
from kfgan_daemon.restore.settings import RestoreSettings
from kfgan_daemon.webrtc import decoder as received_video
from kfgan_daemon.webrtc.backlog import BacklogClosed, FrameBacklog
from kfgan_daemon.webrtc.pli import KeyframeRequester
from kfgan_daemon.webrtc.received import ReceivedVideoTrack

log = logging.getLogger(__name__)

# What an untagged WebRTC picture is, whatever its size: browsers' capture pipelines
# (libwebrtc/libyuv) make I420 with the BT.601 limited-range matrix.
WEBRTC_UNTAGGED_COLOUR = ColourSpace("bt601")
# Seconds a closing stream may take to hand out the frames it already holds.
_CLOSE_DRAIN_TIMEOUT = 2.0
# Recent keyframe arrival times kept for inspection (PLI round trips).
_KEYFRAME_HISTORY = 32
# Received pictures a stream may hold before the engine takes them: beyond this
# the oldest that is not an I-frame gives way (see webrtc.backlog).
RECEIVE_BACKLOG = 2
# Input pictures remembered for their outputs. Far more than an engine stream
# holds at once; the bound matters when nobody calls recv() (a peer that sends
# but does not receive), where outputs are never taken.
_MAX_PENDING_INPUTS = 64


class RestoredVideoTrack(MediaStreamTrack):
    """A video track whose frames are ``source``'s frames with the speaker's face restored.

    ``engine`` must be started. The engine stream is opened by :meth:`open`
    (or on the first ``recv()``); pass ``restorer`` to supply the stream's
    :class:`~kfgan_daemon.restore.StreamRestorer`, else one is built from
    ``restore_settings``. ``receiver`` is the :class:`RTCRtpReceiver` that
    ``source`` comes from; without it no PLIs are sent. ``on_frame`` sees every
    frame this track hands out (e.g. to mirror it to a virtual camera).
    """

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        engine: StreamEngine,
        *,
        stream_id: str | None = None,
        policy: OverloadPolicy = "passthrough",
        restore_settings: RestoreSettings | None = None,
        restorer: FrameRestorer | None = None,
        receiver: RTCRtpReceiver | None = None,
        pli_interval: float = 1.0,
        on_frame: Callable[[av.VideoFrame, Outcome], None] | None = None,
        on_keyframe_request: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        if source.kind != "video":
            raise ValueError(f"RestoredVideoTrack needs a video track, got a {source.kind} track")
        received_video.install()
        self.source = source
        self.engine = engine
        self.policy = policy
        self.keyframe_requester = (
            KeyframeRequester(receiver, min_interval=pli_interval) if receiver is not None else None
        )
        self.keyframe_arrivals: deque[float] = deque(maxlen=_KEYFRAME_HISTORY)
        self.frames_in = 0
        self.frames_out = 0
        # What the peer was actually sent, by outcome (a consumer that falls behind loses outputs
        # the engine's own stats still count).
        self.outcomes_out: Counter[str] = Counter()
        self.frames_dropped_on_receive = 0
        self._stream_id = stream_id
        self._restore_settings = restore_settings
        self._restorer = restorer
        self._on_frame = on_frame
        self._on_keyframe_request = on_keyframe_request
        self._stream: LiveStream | None = None
        self._pump: asyncio.Task[None] | None = None
        # Input pictures by frame index until their output leaves, so that a
        # frame sent unrestored goes out as the very picture that came in.
        self._inputs: OrderedDict[int, av.VideoFrame] = OrderedDict()
        self._closing: asyncio.Future[None] | None = None
        self._received_view: ReceivedVideoTrack | None = None

    # ---- lifecycle -------------------------------------------------------

    @property
    def stream(self) -> LiveStream | None:
        """The engine stream, once started."""
        return self._stream

    @property
    def stream_id(self) -> str | None:
        return self._stream.id if self._stream is not None else self._stream_id

    def open(self) -> LiveStream:
        """Open the engine stream and start reading the source. Idempotent; call inside the event loop.

        Raises :class:`~kfgan_daemon.errors.EngineError` when the engine refuses
        the stream (not started, too many streams).
        """
        if self._stream is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._stream = self.engine.open_stream(
                self._stream_id,
                policy=self.policy,
                realtime=True,
                restore_settings=self._restore_settings,
                restorer=self._restorer,
            )
            self._pump = asyncio.get_running_loop().create_task(
                self._pump_source(self._stream), name=f"kfgan-webrtc-{self._stream.id}-pump"
            )
        return self._stream

    def received_view(self) -> ReceivedVideoTrack:
        """The track of this track's frames as they arrived (decoded, unrestored), each sent with its restored
        counterpart; made on the first call, ended with this track."""
        if self._received_view is None:
            self._received_view = ReceivedVideoTrack()
            if self.readyState != "live":
                self._received_view.stop()
        return self._received_view

    def stop(self) -> None:
        """End this track at once: stop reading the source and close the engine stream."""
        if self.readyState == "ended":
            return
        super().stop()
        if self._received_view is not None:
            self._received_view.stop()
        if self._pump is not None:
            self._pump.cancel()
        self._begin_close(drain=False, timeout=None)

    async def aclose(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stop reading the source and close the engine stream, waiting until it has.

        With ``drain`` the frames already in the engine are still handed out to
        ``recv()`` (for up to ``timeout`` seconds) before the track ends.
        """
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        closing = self._begin_close(drain=drain, timeout=timeout)
        self.stop()
        if closing is not None:
            await asyncio.shield(closing)
        # The callbacks usually close over the session that owns this track: dropping
        # them leaves no reference cycle, so everything is freed now, not at the next gc.
        self._on_frame = None
        self._on_keyframe_request = None
        self._inputs.clear()
        self._pump = None

    def _begin_close(self, drain: bool, timeout: float | None) -> asyncio.Future[None] | None:
        # The engine stream is closed by a task of its own that nobody cancels:
        # a close interrupted half-way would leave the stream neither open nor closed.
        if self._closing is None and self._stream is not None:
            self._closing = asyncio.ensure_future(self._stream.close(drain=drain, timeout=timeout))
        return self._closing

    # ---- MediaStreamTrack ---------------------------------------------------

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        stream = self.open()
        try:
            output = await stream.next_output()
        except StreamClosedError:
            self.stop()
            raise MediaStreamError from None
        frame = await self._to_video_frame(output)
        self.frames_out += 1
        self.outcomes_out[output.outcome.value] += 1
        if self._on_frame is not None:
            try:
                self._on_frame(frame, output.outcome)
            except Exception:  # an observer must never take the call down
                log.exception("stream %s: on_frame callback failed", stream.id)
        return frame

    # ---- source side --------------------------------------------------------

    async def _pump_source(self, stream: LiveStream) -> None:
        loop = asyncio.get_running_loop()
        backlog: FrameBacklog[tuple[av.VideoFrame, float, bool]] = FrameBacklog(RECEIVE_BACKLOG)
        reader = loop.create_task(self._read_source(stream, backlog), name=f"kfgan-webrtc-{stream.id}-read")
        index = 0
        try:
            while True:
                try:
                    picture, arrival, keyframe = await backlog.get()
                except BacklogClosed:
                    break
                self.engine.metrics.receive_backlog.labels(stream.id).set(len(backlog))
                decoded = await loop.run_in_executor(None, _decode, picture, index, keyframe)
                self._inputs[index] = picture
                while len(self._inputs) > _MAX_PENDING_INPUTS:
                    self._inputs.popitem(last=False)
                index += 1
                await stream.submit(decoded, arrival=arrival)
                if stream.needs_keyframe:
                    await self._request_keyframe()
        except StreamClosedError:
            return
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        # The sender is gone: let the frames already in the engine come out, then end.
        self._begin_close(drain=True, timeout=_CLOSE_DRAIN_TIMEOUT)

    async def _read_source(self, stream: LiveStream, backlog: FrameBacklog[tuple[av.VideoFrame, float, bool]]) -> None:
        """Take every picture off aiortc's unbounded queue as it arrives, into the bounded backlog."""
        metrics = self.engine.metrics
        try:
            while True:
                try:
                    picture = await self.source.recv()
                except MediaStreamError:
                    log.info("stream %s: the remote track ended", stream.id)
                    return
                if not isinstance(picture, av.VideoFrame):
                    continue
                arrival = time.monotonic()
                keyframe = is_intra_picture(picture)
                if keyframe:
                    self.keyframe_arrivals.append(arrival)
                self.frames_in += 1
                dropped = backlog.put((picture, arrival, keyframe), keyframe)
                if dropped:
                    self.frames_dropped_on_receive += dropped
                    metrics.receive_dropped.labels(stream.id).inc(dropped)
                metrics.receive_backlog.labels(stream.id).set(len(backlog))
        finally:
            backlog.close()

    async def _request_keyframe(self) -> None:
        requester = self.keyframe_requester
        if requester is None or not requester.ready():
            return
        try:
            sent = await requester.request()
        except Exception as exc:  # a failed RTCP send must not stop the media
            log.warning("stream %s: keyframe request failed: %r", self.stream_id, exc)
            return
        if sent and self._on_keyframe_request is not None:
            self._on_keyframe_request()

    # ---- sink side ----------------------------------------------------------

    async def _to_video_frame(self, output: StreamOutput) -> av.VideoFrame:
        original = self._take_input(output.frame.index)
        if original is not None and self._received_view is not None:
            # A copy: both senders' encoders would otherwise mark the one picture they share.
            copy = await asyncio.get_running_loop().run_in_executor(None, _copy_picture, original)
            self._received_view.show(copy)
        if original is None:
            # Not ours (a restorer that renumbers frames): build from the data.
            return await asyncio.get_running_loop().run_in_executor(None, _encode, output.frame, None)
        if output.outcome not in (Outcome.RESTORED, Outcome.CARRIED_FORWARD):
            return original  # untouched by the engine: the very picture that came in
        return await asyncio.get_running_loop().run_in_executor(None, _encode, output.frame, original)

    def _take_input(self, index: int) -> av.VideoFrame | None:
        # Frames the engine dropped never come out: forget every input up to this one.
        while self._inputs:
            first, picture = next(iter(self._inputs.items()))
            if first > index:
                return None
            del self._inputs[first]
            if first == index:
                return picture
        return None


def _decode(picture: av.VideoFrame, index: int, keyframe: bool) -> DecodedFrame:
    return DecodedFrame.from_av(
        picture, index, is_keyframe=keyframe, colour=ColourSpace.of(picture, fallback=WEBRTC_UNTAGGED_COLOUR)
    )


def _copy_picture(picture: av.VideoFrame) -> av.VideoFrame:
    """The same pixels, tags and timing in a picture of their own."""
    return _encode(_decode(picture, 0, False), picture)


def _encode(frame: DecodedFrame, original: av.VideoFrame | None) -> av.VideoFrame:
    """The frame's planes as a picture (no colour conversion), timed like the input it came from."""
    picture = frame.to_av()
    if original is not None:
        picture.pts = original.pts
        picture.time_base = original.time_base
    return picture
