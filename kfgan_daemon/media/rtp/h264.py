"""H.264 over RTP (RFC 6184, packetization modes 0 and 1): access units from packets, and back.

The depacketizer expects packets in sequence order (see ``jitterbuffer``) and
notices loss from the sequence numbers. An access unit ends at the packet with
the marker bit, or when a packet with another timestamp arrives (a lost
marker). One that lost a packet, a fragment or a malformed payload is still
returned, holding only its intact NAL units and ``complete=False``: what to do
with it (decode with concealment, or drop and wait for a keyframe) is the
receiver's policy, not the depacketizer's.
"""
from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from kfgan_daemon.errors import RtpPacketError
from kfgan_daemon.media.bitstream import (
    NalType,
    h264_access_unit_is_idr,
    h264_access_unit_is_intra,
    join_annexb,
    nal_type,
)
from kfgan_daemon.media.rtp.packet import RTP_HEADER_SIZE, RtpPacket, seq_add

log = logging.getLogger(__name__)

DEFAULT_MTU = 1200
_FU_HEADER_SIZE = 2
_STAP_HEADER_SIZE = 1
_STAP_LENGTH_SIZE = 2


@dataclass(slots=True)
class AccessUnit:
    """The NAL units of one picture, as carried by the packets sharing an RTP timestamp."""

    timestamp: int
    nal_units: list[bytes] = field(default_factory=list)
    complete: bool = True
    first_sequence: int | None = None

    @property
    def is_idr(self) -> bool:
        return h264_access_unit_is_idr(self.nal_units)

    @property
    def is_intra(self) -> bool:
        return h264_access_unit_is_intra(self.nal_units)

    def annexb(self) -> bytes:
        return join_annexb(self.nal_units)


@dataclass(slots=True)
class DepacketizerStats:
    access_units: int = 0
    incomplete: int = 0
    malformed_payloads: int = 0
    gaps: int = 0


class H264Depacketizer:
    def __init__(self) -> None:
        self.stats = DepacketizerStats()
        self._current: AccessUnit | None = None
        self._fragment: bytearray | None = None
        self._last_sequence: int | None = None

    def push(self, packet: RtpPacket) -> list[AccessUnit]:
        """Add the next packet; returns the access units it completes (zero, one or two)."""
        finished: list[AccessUnit] = []
        gap = self._last_sequence is not None and packet.sequence_number != seq_add(self._last_sequence, 1)
        if gap:
            self.stats.gaps += 1
            self._fragment = None
            if self._current is not None:
                self._current.complete = False  # its tail may be among the lost packets
        self._last_sequence = packet.sequence_number
        if self._current is not None and self._current.timestamp != packet.timestamp:
            finished += self._finish()
        unit = self._current or self._start(packet)
        if gap:
            unit.complete = False  # and so may its head
        try:
            self._read_payload(packet.payload, unit)
        except RtpPacketError as exc:
            self.stats.malformed_payloads += 1
            self._fragment = None
            unit.complete = False
            log.debug("packet %d: %s", packet.sequence_number, exc)
        if packet.marker:
            finished += self._finish()
        return finished

    def flush(self) -> list[AccessUnit]:
        """Return the access unit in progress (its marker never came), if any."""
        return self._finish()

    def reset(self) -> None:
        self._current = None
        self._fragment = None
        self._last_sequence = None

    def continue_from(self, sequence_number: int) -> None:
        """The sender's sequence jumped to ``sequence_number`` (validated upstream): not a loss.

        An access unit in progress ends here, and incomplete: the rest of it
        would have come before the jump.
        """
        if self._current is not None:
            self._current.complete = False
        self._fragment = None
        self._last_sequence = seq_add(sequence_number, -1)

    def _start(self, packet: RtpPacket) -> AccessUnit:
        self._current = AccessUnit(timestamp=packet.timestamp, first_sequence=packet.sequence_number)
        return self._current

    def _finish(self) -> list[AccessUnit]:
        unit, self._current = self._current, None
        if unit is None:
            return []
        if self._fragment is not None:
            # A fragmented NAL unit whose end never came.
            unit.complete = False
            self._fragment = None
        self.stats.access_units += 1
        if not unit.complete:
            self.stats.incomplete += 1
        if not unit.nal_units:
            return []
        return [unit]

    def _read_payload(self, payload: bytes, unit: AccessUnit) -> None:
        if not payload:
            raise RtpPacketError("empty H.264 payload")
        if payload[0] & 0x80:
            raise RtpPacketError("H.264 payload with the forbidden_zero_bit set")
        kind = nal_type(payload)
        if kind != NalType.FU_A and self._fragment is not None:
            # A fragmented NAL unit that never got its end fragment.
            self._fragment = None
            unit.complete = False
        if 1 <= kind <= 23:
            unit.nal_units.append(payload)
        elif kind == NalType.STAP_A:
            unit.nal_units.extend(_split_stap_a(payload))
        elif kind == NalType.FU_A:
            self._read_fu_a(payload, unit)
        else:
            raise RtpPacketError(f"H.264 payload type {kind} is not supported in packetization mode 1")

    def _read_fu_a(self, payload: bytes, unit: AccessUnit) -> None:
        if len(payload) < _FU_HEADER_SIZE + 1:
            raise RtpPacketError(f"FU-A packet truncated: {len(payload)} bytes")
        indicator, header = payload[0], payload[1]
        start, end = header & 0x80, header & 0x40
        if start and end:
            raise RtpPacketError("FU-A packet with both start and end bits set")
        if start:
            if self._fragment is not None:
                unit.complete = False
            self._fragment = bytearray([(indicator & 0xE0) | (header & 0x1F)])
        elif self._fragment is None:
            # The start of this NAL unit was lost; its remaining fragments are useless.
            unit.complete = False
            return
        self._fragment += payload[_FU_HEADER_SIZE:]
        if end:
            unit.nal_units.append(bytes(self._fragment))
            self._fragment = None


def _split_stap_a(payload: bytes) -> list[bytes]:
    units = []
    offset = _STAP_HEADER_SIZE
    while offset < len(payload):
        if offset + _STAP_LENGTH_SIZE > len(payload):
            raise RtpPacketError("STAP-A packet truncated inside a NAL unit size")
        size = int.from_bytes(payload[offset : offset + _STAP_LENGTH_SIZE], "big")
        offset += _STAP_LENGTH_SIZE
        if size == 0 or offset + size > len(payload):
            raise RtpPacketError(f"STAP-A packet truncated: NAL unit of {size} bytes at offset {offset}")
        units.append(payload[offset : offset + size])
        offset += size
    if not units:
        raise RtpPacketError("STAP-A packet without NAL units")
    return units


class H264Packetizer:
    """Access units to RTP packets of at most ``mtu`` bytes: single NAL, STAP-A or FU-A."""

    def __init__(
        self,
        payload_type: int = 96,
        ssrc: int | None = None,
        mtu: int = DEFAULT_MTU,
        sequence_number: int | None = None,
    ) -> None:
        if mtu < RTP_HEADER_SIZE + _FU_HEADER_SIZE + 1:
            raise ValueError(f"MTU {mtu} is too small for H.264 RTP packets")
        self.payload_type = payload_type
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.max_payload = mtu - RTP_HEADER_SIZE
        self.sequence_number = secrets.randbits(16) if sequence_number is None else sequence_number

    def packetize(self, nal_units: Iterable[bytes], timestamp: int) -> list[RtpPacket]:
        payloads = list(self._payloads([unit for unit in nal_units if unit]))
        packets = []
        for number, payload in enumerate(payloads):
            packets.append(
                RtpPacket(
                    payload_type=self.payload_type,
                    sequence_number=self.sequence_number,
                    timestamp=timestamp & 0xFFFFFFFF,
                    ssrc=self.ssrc,
                    payload=payload,
                    marker=number == len(payloads) - 1,
                )
            )
            self.sequence_number = seq_add(self.sequence_number, 1)
        return packets

    def _payloads(self, nal_units: list[bytes]) -> Iterable[bytes]:
        pending: list[bytes] = []  # small NAL units waiting to share a STAP-A
        for unit in nal_units:
            if len(unit) > self.max_payload:
                yield from self._aggregate(pending)
                pending = []
                yield from self._fragment(unit)
                continue
            if pending and _stap_size(pending + [unit]) > self.max_payload:
                yield from self._aggregate(pending)
                pending = []
            pending.append(unit)
        yield from self._aggregate(pending)

    @staticmethod
    def _aggregate(units: list[bytes]) -> Iterable[bytes]:
        if len(units) == 1:
            yield units[0]
        elif units:
            # STAP-A's F bit is the OR of its units', NRI their maximum.
            forbidden = max(unit[0] & 0x80 for unit in units)
            nri = max(unit[0] & 0x60 for unit in units)
            parts = [bytes([forbidden | nri | NalType.STAP_A])]
            for unit in units:
                parts.append(len(unit).to_bytes(_STAP_LENGTH_SIZE, "big"))
                parts.append(unit)
            yield b"".join(parts)

    def _fragment(self, unit: bytes) -> Iterable[bytes]:
        indicator = (unit[0] & 0xE0) | NalType.FU_A
        kind = unit[0] & 0x1F
        body = unit[1:]
        size = self.max_payload - _FU_HEADER_SIZE
        for offset in range(0, len(body), size):
            start = 0x80 if offset == 0 else 0
            end = 0x40 if offset + size >= len(body) else 0
            yield bytes([indicator, start | end | kind]) + body[offset : offset + size]


def _stap_size(units: list[bytes]) -> int:
    return _STAP_HEADER_SIZE + sum(_STAP_LENGTH_SIZE + len(unit) for unit in units)
