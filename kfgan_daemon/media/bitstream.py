"""Keyframe facts read straight from coded video: H.264 NAL units and VP8 frame headers.

Decoders are the first authority on picture types; these readers serve where
none is at hand yet (an RTP depacketizer choosing where to start decoding) or
where a decoder drops the flag (libvpx's VP8 decoder, as aiortc uses it).
"""
from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

_VP8_START_CODE = b"\x9d\x01\x2a"


class NalType(IntEnum):
    """H.264 NAL unit types (ITU-T H.264 table 7-1) and the RTP ones of RFC 6184."""

    SLICE = 1
    SLICE_DPA = 2
    IDR = 5
    SEI = 6
    SPS = 7
    PPS = 8
    AUD = 9
    STAP_A = 24
    FU_A = 28


# slice_type values (H.264 table 7-6) of I and SI slices; 5..9 mean "all slices of the picture".
_INTRA_SLICE_TYPES = {2, 4, 7, 9}


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes of 3 or 4 bytes removed)."""
    units: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start != -1:
        begin = start + 3
        start = data.find(b"\x00\x00\x01", begin)
        end = len(data) if start == -1 else start
        # Zero bytes before the next start code belong to it (4-byte start codes,
        # trailing_zero_8bits), never to the NAL unit, whose last byte holds its stop bit.
        unit = data[begin:end].rstrip(b"\x00")
        if unit:
            units.append(unit)
    return units


def join_annexb(nal_units: Iterable[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + unit for unit in nal_units)


def h264_access_unit_is_idr(nal_units: Iterable[bytes]) -> bool:
    """True when the access unit holds an IDR slice (NAL unit type 5)."""
    return any(unit and nal_type(unit) == NalType.IDR for unit in nal_units)


def h264_access_unit_is_intra(nal_units: Iterable[bytes]) -> bool:
    """True when the access unit is an IDR, or all of its slices are I slices (a non-IDR I picture)."""
    slices = 0
    for unit in nal_units:
        if not unit:
            continue
        kind = nal_type(unit)
        if kind == NalType.IDR:
            return True
        if kind in (NalType.SLICE, NalType.SLICE_DPA):
            slice_type = _slice_type(unit)
            if slice_type is None or slice_type not in _INTRA_SLICE_TYPES:
                return False
            slices += 1
    return slices > 0


def _slice_type(nal: bytes) -> int | None:
    """slice_type from a slice header: ue(v) first_mb_in_slice, then ue(v) slice_type."""
    rbsp = _unescape(nal[1:24])
    reader = _BitReader(rbsp)
    if reader.read_ue() is None:
        return None
    return reader.read_ue()


def _unescape(data: bytes) -> bytes:
    """Remove emulation prevention bytes (00 00 03 -> 00 00)."""
    return data.replace(b"\x00\x00\x03", b"\x00\x00")


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def _bit(self) -> int | None:
        byte, bit = divmod(self._position, 8)
        if byte >= len(self._data):
            return None
        self._position += 1
        return (self._data[byte] >> (7 - bit)) & 1

    def read_ue(self) -> int | None:
        """An unsigned Exp-Golomb code, or None when the data ends inside it."""
        zeros = 0
        while True:
            bit = self._bit()
            if bit is None:
                return None
            if bit:
                break
            zeros += 1
            if zeros > 31:
                return None
        value = 0
        for _ in range(zeros):
            bit = self._bit()
            if bit is None:
                return None
            value = (value << 1) | bit
        return (1 << zeros) - 1 + value


def vp8_is_keyframe(frame: bytes) -> bool:
    """True when a VP8 frame (RFC 6386 9.1; RTP payload descriptor removed) is a key frame.

    Bit 0 of the frame tag is 0 on key frames; the 3-byte start code that must
    follow the tag is checked too, so a truncated or foreign payload is not taken
    for a key frame.
    """
    return len(frame) >= 10 and frame[0] & 0x01 == 0 and frame[3:6] == _VP8_START_CODE


def vp8_rtp_payload_is_keyframe(payload: bytes) -> bool:
    """True for the first RTP packet (RFC 7741) of a VP8 key frame, payload descriptor included."""
    if not payload:
        return False
    first = payload[0]
    extended, start, partition = first & 0x80, first & 0x10, first & 0x07
    offset = 1
    if extended:
        if len(payload) < 2:
            return False
        flags = payload[1]
        offset = 2
        if flags & 0x80:  # I: picture id, 7 or 15 bits
            if len(payload) <= offset:
                return False
            offset += 2 if payload[offset] & 0x80 else 1
        if flags & 0x40:  # L: TL0PICIDX
            offset += 1
        if flags & 0x30:  # T or K: TID/KEYIDX byte
            offset += 1
    return bool(start) and partition == 0 and vp8_is_keyframe(payload[offset:])
