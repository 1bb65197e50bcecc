"""Receiving an H.264 RTP stream over UDP (asyncio) as decoded, keyframe-tagged frames.

The socket is read directly (no PyAV SDP demuxer, which holds every picture
back one frame interval): each access unit is decoded as soon as its marker
bit arrives. Decoding runs on one worker thread so that the event loop keeps
draining the socket.

Per packet: parse (malformed or truncated packets are counted and dropped),
reorder (``ReorderBuffer``), depacketize (``H264Depacketizer``), decode
(``H264AccessUnitDecoder``: start-up waits for an intact intra picture, loss is
concealed or waited out per ``loss_policy``). Frames are delivered in order
through ``async for frame in receiver``; when the consumer falls more than
``max_queued_frames`` behind, the oldest queued frame that is not a keyframe
is dropped (counted), so nothing queues without bound.

A sender that goes quiet for ``silence_timeout`` seconds moves the receiver
to ``ReceiverState.SILENT`` (a status event); when packets come back it
resumes. Packets from a new SSRC (a restarted sender) are taken once the
current one has been quiet for ``source_switch_after`` seconds: the change is
reported as a status event of its own, and decoding starts over from the new
sender's next keyframe, with pts continuing after the last frame.

Sequence numbers are validated as in RFC 3550 appendix A.1 (see
``jitterbuffer``): a stray packet far from the sequence is dropped, a real
jump is followed after two packets. Timestamps become pts that stay monotonic
and paced: a timestamp that leaps back (a sender restarted with the same SSRC)
or far ahead re-bases pts on the time that really passed, in whole frame
intervals, instead of jumping with it.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kfgan_daemon.errors import InputError, RtpPacketError
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.rtp.decoder import H264AccessUnitDecoder, LossPolicy
from kfgan_daemon.media.rtp.h264 import AccessUnit, H264Depacketizer
from kfgan_daemon.media.rtp.jitterbuffer import ReorderBuffer
from kfgan_daemon.media.rtp.packet import RtpPacket, is_rtcp
from kfgan_daemon.media.rtp.sdp import H264SessionDescription, parse_sdp

log = logging.getLogger(__name__)

_RECEIVE_BUFFER_BYTES = 4 << 20
_RESET = object()  # queued between access units when the decoder must start over


class ReceiverState(str, enum.Enum):
    WAITING = "waiting"  # no packet yet
    STARTING = "starting"  # packets arrive, no keyframe decoded yet
    RECEIVING = "receiving"
    SILENT = "silent"  # no packet for silence_timeout seconds
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ReceiverStatus:
    state: ReceiverState
    detail: str
    at: float  # event loop time


@dataclass(frozen=True, slots=True)
class RtpReceiverStats:
    """Counters since start; a snapshot, cheap to take."""

    packets_received: int
    bytes_received: int
    packets_malformed: int  # truncated or malformed RTP packets or H.264 payloads
    packets_lost: int
    packets_late: int  # arrived after their place was given up, or duplicated
    packets_ignored: int  # RTCP, other payload types, other SSRCs
    access_units: int
    access_units_incomplete: int
    access_units_dropped: int  # before the first keyframe, by the loss policy, or on decoder overload
    decode_errors: int
    frames_decoded: int
    frames_damaged: int
    keyframes: int
    frames_dropped: int  # consumer too slow
    silences: int
    source_changes: int
    sequence_jumps: int = 0  # sequence numbers that jumped and were followed after probation
    packets_stray: int = 0  # packets far from the sequence that no successor confirmed
    timestamp_jumps: int = 0  # timestamps that leapt; pts were re-based


class _TimestampUnwrapper:
    """32-bit RTP timestamps (90 kHz) to a continuous, paced pts starting at 0.

    Access units come in decode order, so a small step back is normal (B-frames);
    a step back of more than ``max_backward`` ticks or ahead of more than
    ``max_forward`` is a jump. Followed blindly it would make pts go back (an
    encoder downstream can then only clamp, one tick a frame) or leap, so the
    pts continues instead by the time that passed since the previous access
    unit, rounded to whole frame intervals (the last regular step, else
    ``frame_interval``), at least one.
    """

    def __init__(self, frame_interval: int, max_backward: int = 45_000, max_forward: int = 900_000) -> None:
        self.frame_interval = frame_interval
        self.max_backward = max_backward
        self.max_forward = max_forward
        self.jumps = 0
        self._last: int | None = None
        self._last_arrival = 0.0
        self._step = frame_interval
        self._pts = 0

    def __call__(self, timestamp: int, arrival: float) -> int:
        """The pts of an access unit with this RTP timestamp, completed at ``arrival`` (seconds)."""
        if self._last is not None:
            step = ((timestamp - self._last + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            if -self.max_backward <= step <= self.max_forward:
                if step > 0:
                    self._step = step
            else:
                self.jumps += 1
                intervals = max(1, round((arrival - self._last_arrival) * 90000 / self._step))
                step = intervals * self._step
            self._pts += step
        self._last = timestamp
        self._last_arrival = arrival
        return self._pts

    def restart_after(self, pts: int) -> None:
        """The next timestamp (of a new sender) maps to ``pts``."""
        self._last = None
        self._pts = pts


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: "RtpReceiver") -> None:
        self._receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self._receiver._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("RTP socket error: %s", exc)


class RtpReceiver:
    """Async iterator of :class:`DecodedFrame` (pts in 1/90000 s) from one H.264 RTP stream."""

    def __init__(
        self,
        description: H264SessionDescription,
        *,
        host: str | None = None,
        port: int | None = None,
        loss_policy: LossPolicy = "conceal",
        silence_timeout: float = 2.0,
        source_switch_after: float = 0.5,
        reorder_delay: float = 0.03,
        max_queued_frames: int = 8,
        max_queued_access_units: int = 30,
        on_status: Callable[[ReceiverStatus], None] | None = None,
    ) -> None:
        self.description = description
        self.host = description.address if host is None else host
        self.port = description.port if port is None else port
        self.silence_timeout = silence_timeout
        self.source_switch_after = min(source_switch_after, silence_timeout)
        self.max_queued_frames = max_queued_frames
        self.max_queued_access_units = max_queued_access_units
        self.on_status = on_status
        self.sender_address: tuple | None = None
        self._reorder = ReorderBuffer(max_delay=reorder_delay)
        self._depacketizer = H264Depacketizer()
        self._decoder = H264AccessUnitDecoder(description.sprop_parameter_sets, loss_policy=loss_policy)
        self._frame_interval = round(90000 / float(description.frame_rate or 30))
        self._timestamps = _TimestampUnwrapper(self._frame_interval)
        self._state = ReceiverState.WAITING
        self._counts = dict.fromkeys(
            ("packets", "bytes", "malformed", "ignored", "overload_dropped", "frames_dropped", "silences", "sources"), 0
        )
        self._ssrc: int | None = None
        self._last_packet_at = 0.0
        self._last_pts: int | None = None
        self._units: asyncio.Queue = asyncio.Queue()
        self._resync = False
        self._decoder_reset_pending = False
        self._frames: deque[DecodedFrame] = deque()
        self._frame_ready = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtp-decode")
        self._closed = False

    @classmethod
    def from_sdp(cls, sdp: str | os.PathLike[str], **options: object) -> "RtpReceiver":
        """From SDP text (a string holding a line break) or the path of an .sdp file."""
        if isinstance(sdp, str) and "\n" in sdp:
            return cls(parse_sdp(sdp), **options)
        path = Path(sdp)
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise InputError(f"{path}: cannot read the SDP file ({exc.strerror or exc})") from exc
        return cls(parse_sdp(text), **options)

    # -- lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _RtpProtocol(self), local_addr=(self.host, self.port)
            )
        except OSError as exc:
            raise InputError(
                f"cannot listen for RTP on {self.host}:{self.port} ({exc.strerror or exc}); "
                "is another program using the port, or is the SDP's address not one of this host's?"
            ) from exc
        sock = self._transport.get_extra_info("socket")
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER_BYTES)
        except OSError:
            log.debug("could not enlarge the RTP receive buffer")
        self.host, self.port = sock.getsockname()[:2]
        self._last_packet_at = loop.time()
        self._tasks = [
            asyncio.create_task(self._decode_loop(), name="rtp-decode"),
            asyncio.create_task(self._watch_silence(), name="rtp-silence"),
        ]
        log.info("receiving H.264 RTP on %s:%d (payload type %d)", self.host, self.port, self.description.payload_type)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._transport is not None:
            self._transport.close()
        if self._expiry is not None:
            self._expiry.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._set_state(ReceiverState.CLOSED, "closed")
        self._frame_ready.set()

    async def __aenter__(self) -> "RtpReceiver":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- consumer side ------------------------------------------------------------

    def __aiter__(self) -> "RtpReceiver":
        return self

    async def __anext__(self) -> DecodedFrame:
        while not self._frames:
            if self._closed:
                raise StopAsyncIteration
            self._frame_ready.clear()
            await self._frame_ready.wait()
        return self._frames.popleft()

    @property
    def state(self) -> ReceiverState:
        return self._state

    @property
    def colour(self) -> ColourSpace | None:
        """The colour space of the stream's pictures (None before the first); pass it to the sender or y4m writer."""
        return self._decoder.colour

    @property
    def local_address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def stats(self) -> RtpReceiverStats:
        reorder, depacketizer, decoder = self._reorder.stats, self._depacketizer.stats, self._decoder.stats
        return RtpReceiverStats(
            packets_received=self._counts["packets"],
            bytes_received=self._counts["bytes"],
            packets_malformed=self._counts["malformed"] + depacketizer.malformed_payloads,
            packets_lost=reorder.lost,
            packets_late=reorder.late + reorder.duplicates,
            packets_ignored=self._counts["ignored"],
            access_units=depacketizer.access_units,
            access_units_incomplete=depacketizer.incomplete,
            access_units_dropped=decoder.dropped_waiting_keyframe + self._counts["overload_dropped"],
            decode_errors=decoder.decode_errors,
            frames_decoded=decoder.frames,
            frames_damaged=decoder.damaged_frames,
            keyframes=decoder.keyframes,
            frames_dropped=self._counts["frames_dropped"],
            silences=self._counts["silences"],
            source_changes=self._counts["sources"],
            sequence_jumps=reorder.resets,
            packets_stray=reorder.strays,
            timestamp_jumps=self._timestamps.jumps,
        )

    # -- network side -------------------------------------------------------------

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._counts["packets"] += 1
        self._counts["bytes"] += len(data)
        if is_rtcp(data):
            self._counts["ignored"] += 1
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpPacketError as exc:
            self._counts["malformed"] += 1
            log.debug("dropped a packet from %s: %s", addr, exc)
            return
        if packet.payload_type != self.description.payload_type:
            self._counts["ignored"] += 1
            return
        if packet.ssrc != self._ssrc:
            if self._ssrc is not None and now - self._last_packet_at < self.source_switch_after:
                self._counts["ignored"] += 1  # a second sender while the first one talks
                return
            self._adopt_source(packet.ssrc, addr)
        self._last_packet_at = now
        if self._state in (ReceiverState.WAITING, ReceiverState.SILENT):
            if self._decoder_started():
                self._set_state(ReceiverState.RECEIVING, f"packets from {addr[0]}:{addr[1]} again")
            else:
                self._set_state(ReceiverState.STARTING, f"packets from {addr[0]}:{addr[1]}; waiting for a keyframe")
        self._depacketize(self._reorder.push(packet, now))
        self._schedule_expiry()

    def _adopt_source(self, ssrc: int, addr: tuple) -> None:
        if self._ssrc is not None:
            self._counts["sources"] += 1
            self._report(
                ReceiverState.STARTING,
                f"the sender changed: SSRC {self._ssrc:08x} -> {ssrc:08x} from {addr[0]}:{addr[1]}; "
                "waiting for its keyframe",
            )
            self._reorder.reset()
            self._depacketizer.reset()
            self._timestamps.restart_after((self._last_pts or 0) + self._frame_interval)
            self._units.put_nowait(_RESET)
            self._decoder_reset_pending = True
        self._ssrc = ssrc
        self.sender_address = addr

    def _decoder_started(self) -> bool:
        return not self._decoder.waiting_for_keyframe and not self._decoder_reset_pending

    def _depacketize(self, packets: list[RtpPacket]) -> None:
        for packet in packets:
            if self._reorder.starts_new_sequence(packet):
                self._depacketizer.continue_from(packet.sequence_number)
            for unit in self._depacketizer.push(packet):
                self._enqueue(unit)

    def _enqueue(self, unit: AccessUnit) -> None:
        pts = self._timestamps(unit.timestamp, asyncio.get_running_loop().time())
        if self._units.qsize() >= self.max_queued_access_units:
            # Decoding cannot keep up: drop the backlog and restart at the next keyframe.
            reset_pending = False
            while not self._units.empty():
                if self._units.get_nowait() is _RESET:
                    reset_pending = True
                else:
                    self._counts["overload_dropped"] += 1
            if reset_pending:
                self._units.put_nowait(_RESET)
            self._resync = True
            log.warning("RTP decoder overloaded; dropped the backlog, waiting for a keyframe")
        # The unit is complete at its last packet, which is being handled now.
        self._units.put_nowait((unit, pts, time.monotonic()))

    def _schedule_expiry(self) -> None:
        deadline = self._reorder.deadline
        if deadline is None:
            return
        if self._expiry is not None:
            if self._expiry.when() <= deadline:
                return
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        self._depacketize(self._reorder.expire(asyncio.get_running_loop().time()))
        self._schedule_expiry()

    # -- decoding -----------------------------------------------------------------

    async def _decode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self._units.get()
            if item is _RESET:
                await loop.run_in_executor(self._executor, self._decoder.reset)
                self._decoder_reset_pending = False
                continue
            if self._resync:
                self._resync = False
                self._decoder.waiting_for_keyframe = True
            unit, pts, arrival = item
            try:
                frames = await loop.run_in_executor(self._executor, self._decoder.decode, unit, pts)
            except Exception:
                # A decoder bug must not end the stream: this picture is lost, the next keyframe heals.
                log.exception("decoding an access unit failed")
                self._decoder.waiting_for_keyframe = True
                continue
            for frame in frames:
                frame.arrival = arrival
                self._deliver(frame)
            if frames and self._state == ReceiverState.STARTING:
                self._set_state(ReceiverState.RECEIVING, "first keyframe decoded")

    def _deliver(self, frame: DecodedFrame) -> None:
        self._last_pts = frame.pts
        if len(self._frames) >= self.max_queued_frames:
            # By position: frames hold arrays, so they cannot be found by equality.
            victim = next((i for i, queued in enumerate(self._frames) if not queued.is_keyframe), 0)
            del self._frames[victim]
            self._counts["frames_dropped"] += 1
        self._frames.append(frame)
        self._frame_ready.set()

    # -- silence ------------------------------------------------------------------

    async def _watch_silence(self) -> None:
        loop = asyncio.get_running_loop()
        interval = min(self.silence_timeout / 4, 0.25)
        while True:
            await asyncio.sleep(interval)
            quiet = loop.time() - self._last_packet_at
            if self._state in (ReceiverState.STARTING, ReceiverState.RECEIVING) and quiet >= self.silence_timeout:
                self._depacketize(self._reorder.expire(float("inf")))
                for unit in self._depacketizer.flush():
                    self._enqueue(unit)
                self._counts["silences"] += 1
                self._set_state(ReceiverState.SILENT, f"no RTP packet for {quiet:.1f} s")

    def _set_state(self, state: ReceiverState, detail: str) -> None:
        if state == self._state:
            return
        self._report(state, detail)

    def _report(self, state: ReceiverState, detail: str) -> None:
        """Enter ``state`` and tell ``on_status``, even when the state stays the same (a new sender)."""
        self._state = state
        status = ReceiverStatus(state, detail, asyncio.get_running_loop().time())
        log.info("RTP receiver %s:%d %s: %s", self.host, self.port, state.value, detail)
        if self.on_status is not None:
            try:
                self.on_status(status)
            except Exception:
                log.exception("RTP receiver status callback failed")
