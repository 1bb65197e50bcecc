"""What aiortc's decoders drop comes back: the keyframe flag (header readers) and H.264's quantisers; and the
wrapper's installation."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.codecs.h264 import H264Decoder
from aiortc.codecs.vpx import Vp8Decoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from kfgan_daemon.media.colour import ColourSpace
from kfgan_daemon.media.frame import EXPORT_QUANTISERS, DecodedFrame, frame_quantiser, is_intra_picture
from kfgan_daemon.webrtc import decoder as received_video
from kfgan_daemon.webrtc.decoder import ReceivedVideoDecoder, encoded_is_keyframe

GOP = 4
FRAMES = 10


def encoded_clip(codec: str) -> list[tuple[bytes, bool]]:
    """(bitstream, encoder says keyframe) per frame, with a keyframe every GOP frames."""
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = 96, 64, "yuv420p"
    encoder.time_base = Fraction(1, 30)
    encoder.framerate = 30
    encoder.gop_size = GOP
    if codec == "libx264":
        # Annex B output with no B-frames and no scene cuts, as WebRTC senders encode.
        encoder.options = {"tune": "zerolatency", "sc_threshold": "0", "keyint_min": str(GOP), "bf": "0"}
    else:
        encoder.options = {"kf_min_dist": str(GOP)}
    packets: list[tuple[bytes, bool]] = []
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
    for index in range(FRAMES):
        image = np.roll(base, 3 * index, axis=1)  # motion, so that P-frames are cheaper than I-frames
        frame = DecodedFrame.from_rgb(image, ColourSpace("bt601")).to_av()
        frame.pts = index
        packets += [(bytes(packet), packet.is_keyframe) for packet in encoder.encode(frame)]
    packets += [(bytes(packet), packet.is_keyframe) for packet in encoder.encode(None)]
    return packets


@pytest.mark.parametrize(("codec", "name"), [("libvpx", "VP8"), ("libx264", "H264")])
def test_header_reader_agrees_with_the_encoder(codec: str, name: str) -> None:
    packets = encoded_clip(codec)
    assert len(packets) == FRAMES
    flags = [encoded_is_keyframe(name, data) for data, _ in packets]
    assert flags == [keyframe for _, keyframe in packets]
    assert flags[0] and flags[GOP] and not all(flags)


def test_header_reader_rejects_garbage_and_other_codecs() -> None:
    assert not encoded_is_keyframe("VP8", b"")
    assert not encoded_is_keyframe("VP8", b"\x00\x01")  # bit 0 clear but no start code: truncated
    assert not encoded_is_keyframe("H264", b"\x00\x00\x01")
    assert not encoded_is_keyframe("H264", b"\x00\x00\x00\x01\x41\x9a")  # a non-IDR P slice
    assert not encoded_is_keyframe("opus", b"\x00" * 20)


def decode_all(decoder, packets: list[tuple[bytes, bool]]) -> list[av.VideoFrame]:
    frames: list[av.VideoFrame] = []
    for index, (data, _) in enumerate(packets):
        frames += decoder.decode(JitterFrame(data, timestamp=3000 * index))
    return frames


def test_aiortc_vp8_decoder_loses_the_flag_and_the_wrapper_restores_it() -> None:
    packets = encoded_clip("libvpx")
    expected = [keyframe for _, keyframe in packets]
    plain = decode_all(Vp8Decoder(), packets)
    # The reason this module exists: libvpx through aiortc marks nothing.
    assert not any(is_intra_picture(frame) for frame in plain)
    tagged = decode_all(ReceivedVideoDecoder(Vp8Decoder(), "VP8"), packets)
    assert [is_intra_picture(frame) for frame in tagged] == expected


def test_h264_frames_keep_their_flag_through_the_wrapper() -> None:
    packets = encoded_clip("libx264")
    expected = [keyframe for _, keyframe in packets]
    tagged = decode_all(ReceivedVideoDecoder(H264Decoder(), "H264"), packets)
    assert [is_intra_picture(frame) for frame in tagged] == expected


def test_install_wraps_video_decoders_only_and_is_idempotent() -> None:
    from aiortc import rtcrtpreceiver

    received_video.install()
    patched = rtcrtpreceiver.get_decoder
    received_video.install()
    assert rtcrtpreceiver.get_decoder is patched
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
    opus = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)
    assert isinstance(rtcrtpreceiver.get_decoder(vp8), ReceivedVideoDecoder)
    assert not isinstance(rtcrtpreceiver.get_decoder(opus), ReceivedVideoDecoder)
    h264 = rtcrtpreceiver.get_decoder(RTCRtpCodecParameters(mimeType="video/H264", clockRate=90000, payloadType=102))
    assert h264.inner.codec.options["export_side_data"] == EXPORT_QUANTISERS["export_side_data"]


def test_h264_frames_come_with_the_quantisers_ffmpeg_reports() -> None:
    packets = encoded_clip("libx264")
    plain = decode_all(H264Decoder(), packets)
    assert all(frame_quantiser(frame) is None for frame in plain)  # aiortc's decoder as it comes
    wrapped = decode_all(ReceivedVideoDecoder(H264Decoder(), "H264"), packets)
    reference = av.CodecContext.create("h264", "r")
    reference.options = dict(EXPORT_QUANTISERS)
    expected = [frame for data, _ in packets for frame in reference.decode(av.Packet(data))]
    quantisers = [frame_quantiser(frame) for frame in wrapped]
    assert len(quantisers) == FRAMES and all(q is not None and 0 < q <= 51 for q in quantisers)
    assert quantisers == [frame_quantiser(frame) for frame in expected]
    # libx264's default I-frame offset: the keyframes are coded finer than the P-frames.
    assert quantisers[0] < quantisers[1]
