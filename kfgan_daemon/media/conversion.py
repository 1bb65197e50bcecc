"""Conversions between PyAV pictures and :class:`DecodedFrame`.

Pictures are converted to BGR with the matrix their colour tag names (PyAV's
default), and back to YUV with the matrix a sink is told to use, so that a
BT.709 clip stays BT.709 through decode, restoration and encode.
"""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
from av.video.frame import PictureType

from kfgan_daemon.media.frame import DecodedFrame

# AVColorSpace values (libavutil/pixfmt.h) as they appear on frames and codec contexts.
_AVCOL_SPC_BT709 = 1
_AVCOL_SPC_BT470BG = 5
_AVCOL_SPC_SMPTE170M = 6
_AVCOL_RANGE_MPEG = 1

# name -> (swscale matrix, colorspace, primaries, transfer) for tagging the output.
_COLORSPACES = {
    "bt709": ("ITU709", _AVCOL_SPC_BT709, 1, 1),
    "bt601": ("ITU601", _AVCOL_SPC_SMPTE170M, 6, 6),
}


def is_intra_picture(frame: av.VideoFrame) -> bool:
    """True for an I picture, IDR or not (x264 scene cuts make non-IDR I frames)."""
    return bool(frame.key_frame) or frame.pict_type == PictureType.I


def colorspace_name(tagged: av.VideoFrame | av.video.codeccontext.VideoCodecContext) -> str | None:
    """``"bt709"``, ``"bt601"`` or None (untagged or a space we do not convert) for a picture or stream."""
    value = int(tagged.colorspace)
    if value == _AVCOL_SPC_BT709:
        return "bt709"
    if value in (_AVCOL_SPC_BT470BG, _AVCOL_SPC_SMPTE170M):
        return "bt601"
    return None


def to_decoded_frame(
    frame: av.VideoFrame,
    index: int,
    *,
    is_keyframe: bool | None = None,
    time_base: Fraction | None = None,
) -> DecodedFrame:
    """BGR copy of ``frame``; ``is_keyframe`` defaults to the decoder's picture type."""
    return DecodedFrame(
        image=frame.to_ndarray(format="bgr24"),
        pts=frame.pts,
        time_base=frame.time_base if frame.time_base is not None else time_base,
        is_keyframe=is_intra_picture(frame) if is_keyframe is None else is_keyframe,
        index=index,
    )


def yuv420_frame(image: np.ndarray, colorspace: str | None = None) -> av.VideoFrame:
    """A yuv420p picture of a BGR uint8 image, converted with ``colorspace``'s matrix."""
    picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="bgr24")
    if colorspace is None:
        return picture.reformat(format="yuv420p")
    matrix, tag, _, _ = _COLORSPACES[colorspace]
    converted = picture.reformat(format="yuv420p", dst_colorspace=matrix)
    converted.colorspace = tag
    converted.color_range = _AVCOL_RANGE_MPEG
    return converted


def tag_colorspace(codec_context: av.video.codeccontext.VideoCodecContext, colorspace: str | None) -> None:
    """Write the colour description into an encoder so that players use the same matrix."""
    if colorspace is None:
        return
    _, tag, primaries, transfer = _COLORSPACES[colorspace]
    codec_context.colorspace = tag
    codec_context.color_primaries = primaries
    codec_context.color_trc = transfer
    codec_context.color_range = _AVCOL_RANGE_MPEG


def check_colorspace(colorspace: str | None) -> None:
    if colorspace is not None and colorspace not in _COLORSPACES:
        raise ValueError(f"colorspace must be one of {sorted(_COLORSPACES)} or None, not {colorspace!r}")
