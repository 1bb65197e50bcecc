"""Give aiortc's decoded video frames back what their decoders drop: the keyframe flag
and the blocks' quantisers.

aiortc hands a complete encoded frame to ``get_decoder(codec).decode()`` on its
decoder thread and forwards only the decoded pictures.

- FFmpeg's H.264 decoder marks I-frames itself, but the libvpx VP8 decoder leaves
  ``pict_type`` and ``key_frame`` unset, so without help every VP8 frame looks
  predicted and the keyframe store never fills.
- aiortc opens its H.264 decoder without FFmpeg's ``venc_params`` side data, so its
  pictures carry no quantisers and the model would correct every WebRTC frame at full
  strength (:mod:`kfgan_daemon.model.quantiser_strength`), however finely it was coded.

This module is the one place that reaches into aiortc's receive path: it wraps
every video decoder aiortc creates in :class:`ReceivedVideoDecoder`, which reads the
encoded frame's header (VP8: bit 0 of the first byte is 0 on a key frame; H.264:
an IDR slice, NAL unit type 5, or a picture of I slices only) and sets
``pict_type = I`` on the picture decoded from it, which
:func:`kfgan_daemon.media.frame.is_intra_picture` then reads, and asks an FFmpeg
decoder (aiortc's H.264 one) for the quantisers before its first packet, which
:func:`kfgan_daemon.media.frame.frame_quantiser` then reads.
"""
from __future__ import annotations

import logging
import threading
from collections import deque

import av
from av.video.frame import PictureType

from kfgan_daemon.media.bitstream import h264_access_unit_is_intra, split_annexb, vp8_is_keyframe
from kfgan_daemon.media.frame import EXPORT_QUANTISERS

log = logging.getLogger(__name__)

# Decoders may hold a picture back (frame threading); remember enough keyframe
# timestamps to tag it when it comes out.
_PENDING_KEYFRAMES = 16

_install_lock = threading.Lock()
_installed = False


def encoded_is_keyframe(codec_name: str, data: bytes) -> bool:
    """Keyframe test for the codecs the daemon receives; False for any other codec."""
    name = codec_name.lower()
    if name == "vp8":
        return vp8_is_keyframe(data)
    if name == "h264":
        return h264_access_unit_is_intra(split_annexb(data))
    return False


class ReceivedVideoDecoder:
    """An aiortc video decoder wrapper: pictures decoded from keyframes get ``pict_type = I``,
    and an FFmpeg decoder reports every picture's block quantisers."""

    def __init__(self, inner, codec_name: str) -> None:
        self.inner = inner
        self.codec_name = codec_name
        self._keyframe_pts: deque[int] = deque(maxlen=_PENDING_KEYFRAMES)
        # PyAV opens a codec context on its first packet, so options set now still count.
        context = getattr(inner, "codec", None)
        if isinstance(context, av.CodecContext) and not context.is_open:
            context.options = {**context.options, **EXPORT_QUANTISERS}

    def decode(self, encoded_frame) -> list:
        if encoded_is_keyframe(self.codec_name, encoded_frame.data):
            self._keyframe_pts.append(encoded_frame.timestamp)
        frames = self.inner.decode(encoded_frame)
        for frame in frames:
            if frame.pts in self._keyframe_pts and isinstance(frame, av.VideoFrame):
                self._keyframe_pts.remove(frame.pts)
                frame.pict_type = PictureType.I
        return frames


def install() -> None:
    """Wrap the decoders of every aiortc receiver created from now on. Idempotent.

    Receivers look ``get_decoder`` up in ``aiortc.rtcrtpreceiver`` each time their
    decoder thread sees a new codec, so installing before the first packet is
    decoded is enough; audio decoders are left alone.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        from aiortc import rtcrtpreceiver

        original = rtcrtpreceiver.get_decoder

        def get_received_video_decoder(codec):
            decoder = original(codec)
            if codec.mimeType.lower().startswith("video/"):
                return ReceivedVideoDecoder(decoder, codec.name)
            return decoder

        rtcrtpreceiver.get_decoder = get_received_video_decoder
        _installed = True
        log.debug("aiortc video decoders now tag keyframes and report quantisers")
