"""RTCP keyframe requests: the Picture Loss Indication of RFC 4585 section 6.3.1.

A receiver of plain RTP (a Janus RTP forwarder) asks the sender for a new
keyframe with a PLI sent back on the RTCP port; Janus turns it into a keyframe
request to the WebRTC publisher.
"""
from __future__ import annotations

import struct

RECEIVER_REPORT = 201
PAYLOAD_SPECIFIC_FEEDBACK = 206  # PSFB packet type
PLI_FORMAT = 1
_PLI = struct.Struct("!BBHII")


def build_pli(sender_ssrc: int, media_ssrc: int) -> bytes:
    """A 12-byte PLI from ``sender_ssrc`` about the stream ``media_ssrc``."""
    # Version 2, no padding, FMT 1; the length field counts 32-bit words minus one.
    return _PLI.pack(0x80 | PLI_FORMAT, PAYLOAD_SPECIFIC_FEEDBACK, 2, sender_ssrc & 0xFFFFFFFF, media_ssrc & 0xFFFFFFFF)


def build_receiver_report(ssrc: int) -> bytes:
    """An 8-byte receiver report with no report blocks: neutral RTCP to open a path (Janus latches onto its source)."""
    return struct.pack("!BBHI", 0x80, RECEIVER_REPORT, 1, ssrc & 0xFFFFFFFF)


def is_pli(data: bytes) -> bool:
    """Whether a compound RTCP datagram holds a PLI (Janus sends them to a remote publisher's RTCP address)."""
    offset = 0
    while offset + 4 <= len(data):
        first, packet_type, words = struct.unpack_from("!BBH", data, offset)
        if first >> 6 != 2:
            return False
        if packet_type == PAYLOAD_SPECIFIC_FEEDBACK and first & 0x1F == PLI_FORMAT:
            return True
        offset += 4 * (words + 1)
    return False
