"""RTP pieces without sockets: packets, reordering, H.264 (de)packetization, SDP, the access-unit decoder."""
from __future__ import annotations

import base64
from fractions import Fraction

import av
import numpy as np
import pytest

from kfgan_daemon.errors import RtpPacketError, SdpError
from kfgan_daemon.media.bitstream import NalType, nal_type, split_annexb
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame
from kfgan_daemon.media.rtp import (
    AccessUnit,
    H264AccessUnitDecoder,
    H264Depacketizer,
    H264Packetizer,
    H264SessionDescription,
    ReorderBuffer,
    RtpPacket,
    parse_sdp,
)
from kfgan_daemon.media.rtp.packet import seq_delta

# -- a real H.264 stream to chew on ---------------------------------------------------------


def encoded_access_units(count: int = 24, gop: int = 8, width: int = 320, height: int = 240) -> list[list[bytes]]:
    """NAL units per picture from libx264 (zero latency, fixed GOP): IDRs are large enough to need FU-A."""
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, 25), 25
    encoder.gop_size = gop
    encoder.options = {
        "tune": "zerolatency", "preset": "ultrafast", "crf": "18",
        "keyint_min": str(gop), "sc_threshold": "0", "bf": "0",
    }
    units = []
    rng = np.random.default_rng(5)
    texture = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(count):
        picture = DecodedFrame.from_rgb(np.roll(texture, 2 * i, axis=1), ColourSpace("bt601")).to_av()
        picture.pts = i
        for packet in encoder.encode(picture):
            units.append(split_annexb(bytes(packet)))
    return units


@pytest.fixture(scope="module")
def stream() -> list[list[bytes]]:
    return encoded_access_units()


def packetize(units: list[list[bytes]], mtu: int = 1200) -> list[RtpPacket]:
    packetizer = H264Packetizer(payload_type=96, ssrc=0x1234, mtu=mtu, sequence_number=65530)
    packets = []
    for number, nal_units in enumerate(units):
        packets += packetizer.packetize(nal_units, 3600 * number + 0xFFFFF000)
    return packets


def depacketize(packets: list[RtpPacket]) -> tuple[list[AccessUnit], H264Depacketizer]:
    depacketizer = H264Depacketizer()
    units = []
    for packet in packets:
        units += depacketizer.push(packet)
    return units + depacketizer.flush(), depacketizer


# -- RtpPacket ----------------------------------------------------------------------------


def test_packet_round_trip_with_csrc_and_extension() -> None:
    packet = RtpPacket(
        payload_type=96, sequence_number=65535, timestamp=0xFFFFFFFF, ssrc=0xDEADBEEF,
        payload=b"\x65payload", marker=True, csrc=[1, 2], extension_profile=0xBEDE, extension=b"\x10\xff\x00\x00",
    )
    assert RtpPacket.parse(packet.serialize()) == packet


def test_packet_padding_is_removed() -> None:
    data = bytearray(RtpPacket(96, 1, 2, 3, payload=b"\x41abc").serialize() + b"\x00\x00\x03")
    data[0] |= 0x20
    assert RtpPacket.parse(bytes(data)).payload == b"\x41abc"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x60\x00", "truncated"),
        (b"\x40" + bytes(11), "version 1"),
        (b"\x82\x60" + bytes(10) + bytes(4), "CSRC"),
        (b"\x90\x60" + bytes(10) + b"\xbe\xde\x00\x02" + bytes(4), "header extension"),
        (b"\xa0\x60" + bytes(10) + b"\x41\x20", "padding"),
    ],
)
def test_malformed_packets(data: bytes, message: str) -> None:
    with pytest.raises(RtpPacketError, match=message):
        RtpPacket.parse(data)


def test_sequence_arithmetic_wraps() -> None:
    assert seq_delta(2, 65534) == 4
    assert seq_delta(65534, 2) == -4
    assert seq_delta(7, 7) == 0


# -- H.264 packetization ------------------------------------------------------------------


def test_round_trip_uses_single_stap_a_and_fu_a(stream: list[list[bytes]]) -> None:
    packets = packetize(stream)
    kinds = {nal_type(packet.payload) for packet in packets}
    assert {NalType.STAP_A, NalType.FU_A} <= kinds
    assert kinds & set(range(1, 24)), "small slices travel as single NAL unit packets"
    assert all(len(packet.serialize()) <= 1200 for packet in packets)
    assert sum(packet.marker for packet in packets) == len(stream)
    units, depacketizer = depacketize(packets)
    assert [unit.nal_units for unit in units] == stream
    assert all(unit.complete for unit in units)
    assert [unit.is_idr for unit in units] == [i % 8 == 0 for i in range(len(stream))]
    assert depacketizer.stats.gaps == 0 and depacketizer.stats.incomplete == 0


def test_small_mtu_fragments_every_slice(stream: list[list[bytes]]) -> None:
    packets = packetize(stream[:3], mtu=100)
    assert all(len(packet.serialize()) <= 100 for packet in packets)
    units, _ = depacketize(packets)
    assert [unit.nal_units for unit in units] == stream[:3]


def test_lost_middle_fragment_breaks_only_that_nal_unit(stream: list[list[bytes]]) -> None:
    packets = packetize(stream[:2])
    fragments = [i for i, p in enumerate(packets) if nal_type(p.payload) == NalType.FU_A and p.timestamp == packets[0].timestamp]
    del packets[fragments[len(fragments) // 2]]
    units, depacketizer = depacketize(packets)
    first, second = units
    assert not first.complete and second.complete  # the packets after the gap still carried the first picture
    # Exactly the fragmented NAL unit is gone; every other one arrived intact.
    assert len(first.nal_units) == len(stream[0]) - 1
    assert all(unit in stream[0] for unit in first.nal_units)
    assert second.nal_units == stream[1]
    assert depacketizer.stats.gaps == 1


def test_lost_marker_packet_still_ends_the_access_unit(stream: list[list[bytes]]) -> None:
    packets = packetize(stream[1:4])
    for packet in packets:
        packet.marker = False
    units, _ = depacketize(packets)
    assert [unit.nal_units for unit in units] == stream[1:4]


def test_malformed_payloads_are_counted_not_raised(stream: list[list[bytes]]) -> None:
    packets = packetize(stream[:2])
    stap = next(p for p in packets if nal_type(p.payload) == NalType.STAP_A)
    stap.payload = stap.payload[:4]  # length says more than there is
    extra = RtpPacket(96, 0, packets[-1].timestamp + 3600, 0x1234, payload=b"\x7c", marker=True)  # FU-A of one byte
    extra.sequence_number = (packets[-1].sequence_number + 1) & 0xFFFF
    empty = RtpPacket(96, (extra.sequence_number + 1) & 0xFFFF, extra.timestamp + 3600, 0x1234, payload=b"", marker=True)
    units, depacketizer = depacketize(packets + [extra, empty])
    assert depacketizer.stats.malformed_payloads == 3
    assert not units[0].complete and units[1].complete
    assert len(units) == 2  # the malformed-only pictures carry nothing to decode


def test_fragments_without_their_start_are_dropped() -> None:
    depacketizer = H264Depacketizer()
    middle = RtpPacket(96, 10, 5, 1, payload=b"\x7c\x05" + b"x" * 20)
    end = RtpPacket(96, 11, 5, 1, payload=b"\x7c\x45" + b"y" * 20, marker=True)
    assert depacketizer.push(middle) == []
    assert depacketizer.push(end) == []  # nothing decodable was left of that picture
    assert depacketizer.stats.incomplete == 1


# -- reordering ---------------------------------------------------------------------------


def numbered(*sequence_numbers: int) -> list[RtpPacket]:
    return [RtpPacket(96, n & 0xFFFF, 0, 1) for n in sequence_numbers]


def sequence_numbers(packets: list[RtpPacket]) -> list[int]:
    return [p.sequence_number for p in packets]


def test_in_order_packets_pass_straight_through() -> None:
    buffer = ReorderBuffer(max_delay=0.05)
    assert [sequence_numbers(buffer.push(p, 0.0)) for p in numbered(65534, 65535, 0, 1)] == [[65534], [65535], [0], [1]]
    assert buffer.held == 0 and buffer.deadline is None


def test_swapped_packets_are_put_back_in_order() -> None:
    buffer = ReorderBuffer(max_delay=0.05)
    out = []
    for p in numbered(1, 3, 2, 4):
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [1, 2, 3, 4]
    assert buffer.stats.reordered == 1 and buffer.stats.lost == 0


def test_missing_packet_is_given_up_after_the_delay() -> None:
    buffer = ReorderBuffer(max_delay=0.05)
    assert sequence_numbers(buffer.push(numbered(1)[0], 0.0)) == [1]
    assert buffer.push(numbered(3)[0], 0.01) == []
    assert buffer.push(numbered(4)[0], 0.02) == []
    assert buffer.deadline == pytest.approx(0.06)
    assert buffer.expire(0.05) == []
    assert sequence_numbers(buffer.expire(0.061)) == [3, 4]
    assert buffer.stats.lost == 1
    assert buffer.push(numbered(2)[0], 0.07) == [] and buffer.stats.late == 1


def test_holding_is_bounded_by_packet_count() -> None:
    buffer = ReorderBuffer(max_delay=10.0, max_packets=3)
    out = buffer.push(numbered(0)[0], 0.0)
    for p in numbered(2, 3, 4, 5):
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [0, 2, 3, 4, 5]


def test_duplicates_and_sender_restarts() -> None:
    buffer = ReorderBuffer()
    out = []
    for p in numbered(100, 101, 101, 103, 103, 102, 40000, 40001):
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [100, 101, 102, 103, 40000, 40001]
    assert buffer.stats.late == 1  # the second 101, after 101 was released
    assert buffer.stats.duplicates == 1  # the second 103, while 103 was held
    assert buffer.stats.resets == 1


def test_a_stray_packet_far_ahead_is_dropped_without_stalling_the_stream() -> None:
    # RFC 3550 A.1 probation: a jump counts only once the packet after it arrives next.
    buffer = ReorderBuffer()
    out = []
    for p in numbered(10, 11, 1011, 12, 13, 14):
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [10, 11, 12, 13, 14]
    assert buffer.held == 0 and buffer.stats.lost == 0 and buffer.stats.resets == 0
    out = buffer.push(numbered(60000)[0], 2.0)  # a second stray, long after: the first one is written off
    assert out == [] and buffer.stats.strays == 1
    assert sequence_numbers(buffer.push(numbered(15)[0], 2.0)) == [15]


def test_a_backward_sequence_jump_is_followed_after_two_packets() -> None:
    buffer = ReorderBuffer()
    out = []
    for p in numbered(1000, 1001, 1002, 500, 501, 502):
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [1000, 1001, 1002, 500, 501, 502]
    assert buffer.stats.resets == 1 and buffer.stats.late == 0


def test_a_forward_jump_with_reordering_keeps_both_probation_packets() -> None:
    buffer = ReorderBuffer()
    out = []
    for p in numbered(7, 8, 5000, 9, 5001, 5002):  # 9 was delayed past the jump
        out += buffer.push(p, 0.0)
    assert sequence_numbers(out) == [7, 8, 9, 5000, 5001, 5002]


# -- SDP ----------------------------------------------------------------------------------

FFMPEG_SDP = """v=0
o=- 0 0 IN IP4 127.0.0.1
s=No Name
c=IN IP4 127.0.0.1
t=0 0
a=tool:libavformat 61.7.100
m=audio 5006 RTP/AVP 97
a=rtpmap:97 MPEG4-GENERIC/48000/2
m=video 5004 RTP/AVP 96
a=rtpmap:96 H264/90000
a=fmtp:96 packetization-mode=1; sprop-parameter-sets=Z2QAHqzZQKAv+XARAAADAAEAAAMAMg8WLZY=,aOvjyyLA; profile-level-id=64001E
"""


def test_parse_ffmpeg_sdp() -> None:
    description = parse_sdp(FFMPEG_SDP)
    assert (description.address, description.port, description.payload_type) == ("127.0.0.1", 5004, 96)
    assert description.packetization_mode == 1 and description.profile_level_id == "64001E"
    assert [nal_type(unit) for unit in description.sprop_parameter_sets] == [NalType.SPS, NalType.PPS]


def test_sdp_write_parse_round_trip() -> None:
    description = H264SessionDescription(
        address="127.0.0.1", port=6000, payload_type=102, profile_level_id="42E01F",
        sprop_parameter_sets=[b"\x67\x42\xe0\x1f", b"\x68\xce\x06\xe2"], frame_rate=Fraction(30000, 1001),
    )
    text = description.to_sdp()
    assert text.startswith("v=0\r\n") and "m=video 6000 RTP/AVP 102" in text
    assert parse_sdp(text) == description
    ipv6 = H264SessionDescription(address="::1", port=6002)
    assert parse_sdp(ipv6.to_sdp()) == ipv6


def test_media_level_connection_and_second_payload_type() -> None:
    text = (
        "v=0\no=- 1 1 IN IP4 10.0.0.1\ns=x\nt=0 0\nm=video 7000 RTP/AVP 100 101\nc=IN IP4 127.0.0.1\n"
        "a=rtpmap:100 VP8/90000\na=rtpmap:101 H264/90000\na=fmtp:101 packetization-mode=0\n"
    )
    description = parse_sdp(text)
    assert (description.address, description.payload_type, description.packetization_mode) == ("127.0.0.1", 101, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "must start with 'v=0'"),
        ("\x00\x01garbage\xff", "must start with 'v=0'"),
        ("v=0\nthis is not sdp\n", "line 2"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=audio 5000 RTP/AVP 0\n", "no video stream"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 5000 RTP/AVP 96\na=rtpmap:96 VP8/90000\n", "no H264 payload type"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 0 RTP/AVP 96\na=rtpmap:96 H264/90000\n", "port 0"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 5000 RTP/SAVP 96\na=rtpmap:96 H264/90000\n", "SRTP"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/90000\na=fmtp:96 packetization-mode=2\n",
         "packetization-mode 2"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/8000\n", "clock rate"),
        ("v=0\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/90000\n", "no connection address"),
        ("v=0\nc=IN IP4 239.1.1.1\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/90000\n", "multicast"),
        ("v=0\nc=IN IP4 host.example\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/90000\n", "not an IP address"),
        ("v=0\nc=IN IP4 127.0.0.1\nm=video 5000 RTP/AVP 96\na=rtpmap:96 H264/90000\n"
         "a=fmtp:96 packetization-mode=1;sprop-parameter-sets=%%%\n", "not base64"),
    ],
)
def test_unusable_sdp(text: str, message: str) -> None:
    with pytest.raises(SdpError, match=message):
        parse_sdp(text)


# -- access-unit decoder ------------------------------------------------------------------


def access_units(stream: list[list[bytes]]) -> list[AccessUnit]:
    return [AccessUnit(timestamp=3600 * i, nal_units=list(units)) for i, units in enumerate(stream)]


def decode_all(decoder: H264AccessUnitDecoder, units: list[AccessUnit]) -> list:
    frames = []
    for unit in units:
        frames += decoder.decode(unit, unit.timestamp)
    return frames


def test_decoder_tags_idrs_and_decodes_without_holdback(stream: list[list[bytes]]) -> None:
    decoder = H264AccessUnitDecoder()
    for i, unit in enumerate(access_units(stream)):
        (frame,) = decoder.decode(unit, unit.timestamp)  # one picture out per access unit in
        assert frame.pts == 3600 * i and frame.time_base == Fraction(1, 90000)
        assert frame.is_keyframe == (i % 8 == 0)
        assert frame.y.shape == (240, 320) and frame.u.shape == (120, 160)
        # CRF 18: the decoder reports every picture's block quantisers near it.
        assert frame.quantiser is not None and 8 < frame.quantiser < 28


def test_decoder_starts_at_the_first_keyframe(stream: list[list[bytes]]) -> None:
    decoder = H264AccessUnitDecoder()
    frames = decode_all(decoder, access_units(stream)[3:])
    assert decoder.stats.dropped_waiting_keyframe == 5
    assert frames[0].is_keyframe and frames[0].pts == 3600 * 8
    assert len(frames) == len(stream) - 8


def test_decoder_uses_sdp_parameter_sets(stream: list[list[bytes]]) -> None:
    parameter_sets = [u for u in stream[0] if nal_type(u) in (NalType.SPS, NalType.PPS)]
    stripped = [[u for u in units if nal_type(u) not in (NalType.SPS, NalType.PPS)] for units in stream]
    assert len(decode_all(H264AccessUnitDecoder(), access_units(stripped))) == 0
    frames = decode_all(H264AccessUnitDecoder(parameter_sets), access_units(stripped))
    assert len(frames) == len(stream) and frames[0].is_keyframe


def lose_last_slice(units: list[AccessUnit], index: int) -> list[AccessUnit]:
    damaged = list(units)
    unit = damaged[index]
    assert nal_type(unit.nal_units[-1]) in (NalType.SLICE, NalType.IDR)
    damaged[index] = AccessUnit(unit.timestamp, unit.nal_units[:-1], complete=False)
    return damaged


def pts_of(frames: list) -> list[int]:
    return [f.pts // 3600 for f in frames]


def test_loss_concealed(stream: list[list[bytes]]) -> None:
    decoder = H264AccessUnitDecoder(loss_policy="conceal")
    frames = decode_all(decoder, lose_last_slice(access_units(stream), 10))
    assert pts_of(frames) == list(range(len(stream)))
    assert pts_of(f for f in frames if f.is_keyframe) == [0, 8, 16]
    assert decoder.stats.damaged_frames == 6  # pictures 10..15, until the next IDR


def test_damaged_idr_is_not_a_keyframe(stream: list[list[bytes]]) -> None:
    decoder = H264AccessUnitDecoder(loss_policy="conceal")
    frames = decode_all(decoder, lose_last_slice(access_units(stream), 8))
    assert 8 in pts_of(frames)
    assert pts_of(f for f in frames if f.is_keyframe) == [0, 16]


def test_loss_waits_for_the_next_keyframe(stream: list[list[bytes]]) -> None:
    decoder = H264AccessUnitDecoder(loss_policy="wait_keyframe")
    frames = decode_all(decoder, lose_last_slice(access_units(stream), 10))
    assert pts_of(frames) == list(range(10)) + list(range(16, len(stream)))
    assert decoder.stats.damaged_frames == 0 and decoder.stats.dropped_waiting_keyframe == 6


def test_corrupt_payload_does_not_raise(stream: list[list[bytes]]) -> None:
    units = access_units(stream)
    rng = np.random.default_rng(9)
    slice_unit = units[3].nal_units[-1]
    units[3] = AccessUnit(units[3].timestamp, [slice_unit[:2] + rng.integers(0, 256, len(slice_unit) - 2, np.uint8).tobytes()])
    units[4] = AccessUnit(units[4].timestamp, [b"\x41\xff\xff\xff\xff"])
    decoder = H264AccessUnitDecoder()
    frames = decode_all(decoder, units)
    assert len(frames) >= len(stream) - 2
    assert pts_of(f for f in frames if f.is_keyframe) == [0, 8, 16]


def test_sprop_base64_in_sdp_matches_encoder_output(stream: list[list[bytes]]) -> None:
    sps = next(u for u in stream[0] if nal_type(u) == NalType.SPS)
    pps = next(u for u in stream[0] if nal_type(u) == NalType.PPS)
    text = H264SessionDescription("127.0.0.1", 5000, sprop_parameter_sets=[sps, pps]).to_sdp()
    assert base64.b64encode(sps).decode() in text
    assert parse_sdp(text).sprop_parameter_sets == [sps, pps]
