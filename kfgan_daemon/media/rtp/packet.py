"""RTP packets (RFC 3550 section 5.1): parsing and serialising the fixed header."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kfgan_daemon.errors import RtpPacketError

RTP_VERSION = 2
RTP_HEADER_SIZE = 12
_HEADER = struct.Struct("!BBHII")


def seq_add(sequence_number: int, delta: int) -> int:
    return (sequence_number + delta) & 0xFFFF


def seq_delta(newer: int, older: int) -> int:
    """Signed distance from ``older`` to ``newer`` in 16-bit sequence space (-32768..32767)."""
    return ((newer - older + 0x8000) & 0xFFFF) - 0x8000


def is_rtcp(data: bytes) -> bool:
    """RTCP packets multiplexed on an RTP port (RFC 5761): payload type octet 192..223."""
    return len(data) >= 2 and 192 <= data[1] <= 223


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence_number: int
    timestamp: int
    ssrc: int
    payload: bytes = b""
    marker: bool = False
    csrc: list[int] = field(default_factory=list)
    extension_profile: int | None = None
    extension: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> "RtpPacket":
        """Parse one datagram; :class:`RtpPacketError` says what is wrong with a bad one."""
        if len(data) < RTP_HEADER_SIZE:
            raise RtpPacketError(f"RTP packet truncated: {len(data)} bytes, the fixed header needs {RTP_HEADER_SIZE}")
        first, second, sequence_number, timestamp, ssrc = _HEADER.unpack_from(data)
        version = first >> 6
        if version != RTP_VERSION:
            raise RtpPacketError(f"not an RTP packet: version {version}")
        padding, has_extension, csrc_count = first & 0x20, first & 0x10, first & 0x0F
        offset = RTP_HEADER_SIZE + 4 * csrc_count
        if len(data) < offset:
            raise RtpPacketError(f"RTP packet truncated inside its {csrc_count} CSRC entries")
        csrc = list(struct.unpack_from(f"!{csrc_count}I", data, RTP_HEADER_SIZE))
        extension_profile = None
        extension = b""
        if has_extension:
            if len(data) < offset + 4:
                raise RtpPacketError("RTP packet truncated inside its header extension")
            extension_profile, words = struct.unpack_from("!HH", data, offset)
            offset += 4
            if len(data) < offset + 4 * words:
                raise RtpPacketError("RTP packet truncated inside its header extension")
            extension = bytes(data[offset : offset + 4 * words])
            offset += 4 * words
        end = len(data)
        if padding:
            padding_size = data[-1]
            if padding_size == 0 or end - padding_size < offset:
                raise RtpPacketError(f"RTP packet with an invalid padding size {padding_size}")
            end -= padding_size
        return cls(
            payload_type=second & 0x7F,
            sequence_number=sequence_number,
            timestamp=timestamp,
            ssrc=ssrc,
            payload=bytes(data[offset:end]),
            marker=bool(second & 0x80),
            csrc=csrc,
            extension_profile=extension_profile,
            extension=extension,
        )

    def serialize(self) -> bytes:
        if len(self.extension) % 4:
            raise ValueError("an RTP header extension is a whole number of 32-bit words")
        if len(self.csrc) > 15:
            raise ValueError("an RTP packet carries at most 15 CSRC identifiers")
        has_extension = self.extension_profile is not None
        first = (RTP_VERSION << 6) | (0x10 if has_extension else 0) | len(self.csrc)
        second = (0x80 if self.marker else 0) | (self.payload_type & 0x7F)
        parts = [_HEADER.pack(first, second, self.sequence_number & 0xFFFF, self.timestamp & 0xFFFFFFFF, self.ssrc)]
        if self.csrc:
            parts.append(struct.pack(f"!{len(self.csrc)}I", *self.csrc))
        if has_extension:
            parts.append(struct.pack("!HH", self.extension_profile, len(self.extension) // 4))
            parts.append(self.extension)
        parts.append(self.payload)
        return b"".join(parts)
