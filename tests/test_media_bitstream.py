"""Keyframe facts from coded video: H.264 NAL units and VP8 frame headers, checked against real encoders."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
from av.video.frame import PictureType

from kfgan_daemon.media.bitstream import (
    NalType,
    h264_access_unit_is_idr,
    h264_access_unit_is_intra,
    join_annexb,
    nal_type,
    split_annexb,
    vp8_is_keyframe,
    vp8_rtp_payload_is_keyframe,
)
from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import DecodedFrame


def pictures(count: int, width: int = 64, height: int = 48, cut_at: int | None = None):
    for i in range(count):
        rng = np.random.default_rng(1000 + i if cut_at is not None and i >= cut_at else 0)
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = np.roll(base, i, axis=1)
        picture = DecodedFrame.from_rgb(image, ColourSpace("bt601")).to_av()
        picture.pts, picture.time_base = i, Fraction(1, 25)
        yield picture


def encode(codec: str, frames, options: dict[str, str], force_key_at: int | None = None) -> list[av.Packet]:
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = 64, 48, "yuv420p"
    encoder.time_base, encoder.framerate = Fraction(1, 25), 25
    encoder.options = options
    packets = []
    for i, picture in enumerate(frames):
        if i == force_key_at:
            picture.pict_type = PictureType.I
        packets += encoder.encode(picture)
    return packets + encoder.encode(None)


def test_split_annexb_handles_both_start_codes_and_trailing_zeros() -> None:
    units = [b"\x67\x42\x00\x1e", b"\x68\xce", b"\x65\x88\x84\x00\x01"]
    stream = b"\x00\x00\x00\x01" + units[0] + b"\x00\x00\x01" + units[1] + b"\x00\x00\x00\x00\x01" + units[2]
    assert split_annexb(stream) == units
    assert split_annexb(join_annexb(units)) == units
    assert split_annexb(b"") == []


def test_h264_idr_and_intra_match_the_decoder() -> None:
    packets = encode(
        "libx264",
        pictures(30, cut_at=12),
        {"x264-params": "keyint=250:min-keyint=100:scenecut=40", "bf": "0", "preset": "ultrafast"},
    )
    decoder = av.CodecContext.create("h264", "r")
    seen = {"idr": 0, "non_idr_intra": 0, "predicted": 0}
    for packet in packets:
        units = split_annexb(bytes(packet))
        (picture,) = decoder.decode(av.Packet(bytes(packet)))
        intra_picture = picture.pict_type == PictureType.I
        assert h264_access_unit_is_intra(units) == intra_picture
        assert h264_access_unit_is_idr(units) == bool(picture.key_frame)
        if h264_access_unit_is_idr(units):
            seen["idr"] += 1
            assert {NalType.SPS, NalType.PPS} <= {nal_type(unit) for unit in units}
        elif intra_picture:
            seen["non_idr_intra"] += 1
        else:
            seen["predicted"] += 1
    assert seen["idr"] == 1 and seen["non_idr_intra"] >= 1 and seen["predicted"] > 0


def test_h264_intra_reader_handles_empty_and_header_only_units() -> None:
    assert not h264_access_unit_is_intra([])
    assert not h264_access_unit_is_intra([b"\x67\x42", b"\x68"])  # parameter sets, no slice
    assert not h264_access_unit_is_intra([b"\x41"])  # a slice header cut short
    assert not h264_access_unit_is_idr([b"", b"\x41\x9a"])


def test_vp8_keyframe_flag_matches_libvpx() -> None:
    packets = encode("libvpx", pictures(12), {"deadline": "realtime", "lag-in-frames": "0"}, force_key_at=7)
    flags = [vp8_is_keyframe(bytes(packet)) for packet in packets]
    assert flags == [packet.is_keyframe for packet in packets]
    assert flags[0] and flags[7] and sum(flags) == 2


def test_vp8_rtp_payload_descriptor() -> None:
    packets = encode("libvpx", pictures(2), {"deadline": "realtime", "lag-in-frames": "0"})
    key, inter = bytes(packets[0]), bytes(packets[1])
    assert vp8_rtp_payload_is_keyframe(b"\x10" + key)  # S=1, PID=0
    assert vp8_rtp_payload_is_keyframe(b"\x90\x80\x81\x23" + key)  # X, I with a 15-bit picture id
    assert vp8_rtp_payload_is_keyframe(b"\x90\xe0\x05\x07\x00" + key)  # X, I (7-bit), L, T
    assert not vp8_rtp_payload_is_keyframe(b"\x00" + key)  # continuation packet (S=0)
    assert not vp8_rtp_payload_is_keyframe(b"\x10" + inter)
    assert not vp8_rtp_payload_is_keyframe(b"")
    assert not vp8_is_keyframe(key[:5])
