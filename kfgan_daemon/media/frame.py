"""The unit that travels between media and restoration: a decoded yuv420p picture."""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import av
import numpy as np
from av.sidedata.encparams import VideoEncParams, VideoEncParamsType
from av.video.frame import PictureType

from kfgan_daemon.media.colour import Box, ColourSpace, region_to_rgb, rgb_to_yuv, yuv_to_rgb


def is_intra_picture(frame: av.VideoFrame) -> bool:
    """True for an I picture, IDR or not (x264 scene cuts make non-IDR I frames)."""
    return bool(frame.key_frame) or frame.pict_type == PictureType.I


def frame_quantiser(frame: av.VideoFrame) -> float | None:
    """The mean quantiser over a decoded frame's blocks on H.264's QP scale (None: the decoder
    exported none, or on a scale without a known mapping, VP9's).

    FFmpeg's decoders export the blocks' quantisers only when opened with
    ``export_side_data=venc_params`` (:data:`EXPORT_QUANTISERS`)."""
    for data in frame.side_data:
        if not isinstance(data, VideoEncParams) or data.nb_blocks == 0:
            continue
        if data.codec_type == VideoEncParamsType.H264:
            return float(data.qp_map().mean())
        if data.codec_type == VideoEncParamsType.MPEG2:
            # MPEG-1/2/4 quantise with a step of 2 * qscale; H.264's step is 1 at QP 4 and
            # doubles every 6, so the same step is QP 10 + 6 log2(qscale).
            qscale = np.maximum(data.qp_map().astype(np.float64), 1.0)
            return float(np.mean(10.0 + 6.0 * np.log2(qscale)))
    return None


# Decoder options under which FFmpeg attaches every block's quantiser to the picture.
EXPORT_QUANTISERS = {"export_side_data": "venc_params"}


def _plane_array(plane: av.video.plane.VideoPlane) -> np.ndarray:
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return np.ascontiguousarray(rows[:, : plane.width])


@dataclass(slots=True)
class DecodedFrame:
    """One decoded picture in the stream's own YUV 4:2:0.

    ``y`` is H x W, ``u`` and ``v`` are ceil(H/2) x ceil(W/2), all uint8, with the
    stream's :class:`ColourSpace` in ``colour``. ``is_keyframe`` comes from the
    decoder's picture type or the packet flags, never from the frame number.
    """

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    colour: ColourSpace
    pts: int | None = None
    time_base: Fraction | None = None
    is_keyframe: bool = False
    index: int = 0
    # time.monotonic() when the frame's last packet arrived (live inputs): the engine's
    # real-time deadline counts from it, so receive and decode time are inside the budget.
    arrival: float | None = None
    # The mean quantiser of the frame's blocks (H.264's QP scale) as its decoder reported
    # it (None: not reported); the model scales its correction by it.
    quantiser: float | None = None

    @classmethod
    def from_av(
        cls,
        picture: av.VideoFrame,
        index: int = 0,
        *,
        is_keyframe: bool | None = None,
        time_base: Fraction | None = None,
        colour: ColourSpace | None = None,
    ) -> "DecodedFrame":
        """The planes of ``picture`` (copied); pixel formats other than yuv420p/yuvj420p are
        resampled to yuv420p first. ``colour`` overrides the picture's tags (a stream's
        tags may live on its codec context only)."""
        space = colour if colour is not None else ColourSpace.of(picture)
        planar = picture
        if picture.format.name not in ("yuv420p", "yuvj420p"):
            planar = picture.reformat(format="yuv420p")
        y, u, v = (_plane_array(plane) for plane in planar.planes[:3])
        return cls(
            y=y,
            u=u,
            v=v,
            colour=space,
            pts=picture.pts,
            time_base=picture.time_base if picture.time_base is not None else time_base,
            is_keyframe=is_intra_picture(picture) if is_keyframe is None else is_keyframe,
            index=index,
            quantiser=frame_quantiser(picture),
        )

    @classmethod
    def from_rgb(cls, rgb: np.ndarray, colour: ColourSpace, **fields: object) -> "DecodedFrame":
        """A frame of an H x W x 3 uint8 RGB image (synthetic pictures, model output at frame size)."""
        y, u, v = rgb_to_yuv(rgb, colour)
        return cls(y=y, u=u, v=v, colour=colour, **fields)  # type: ignore[arg-type]

    def to_av(self) -> av.VideoFrame:
        """A tagged yuv420p ``av.VideoFrame`` of the planes, without any colour conversion."""
        picture = av.VideoFrame(self.width, self.height, "yuv420p")
        for plane, data in zip(picture.planes, (self.y, self.u, self.v)):
            rows = np.asarray(memoryview(plane)).reshape(plane.height, plane.line_size)
            rows[:, : plane.width] = data
        self.colour.tag(picture)
        picture.pts = self.pts
        if self.time_base is not None:
            picture.time_base = self.time_base
        return picture

    @property
    def luma(self) -> np.ndarray:
        """The Y plane: the grayscale picture face detection and tracking work on."""
        return self.y

    @property
    def width(self) -> int:
        return int(self.y.shape[1])

    @property
    def height(self) -> int:
        return int(self.y.shape[0])

    @property
    def planes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.y, self.u, self.v

    def rgb(self, box: Box | None = None) -> np.ndarray:
        """RGB of the whole picture, or of the even rectangle ``box`` only."""
        if box is None:
            return yuv_to_rgb(self.y, self.u, self.v, self.colour)
        return region_to_rgb(self.y, self.u, self.v, box, self.colour)

    def copy(self) -> "DecodedFrame":
        """The same picture with planes of its own (to write into)."""
        return replace(self, y=self.y.copy(), u=self.u.copy(), v=self.v.copy())

    def with_planes(
        self, y: np.ndarray, u: np.ndarray, v: np.ndarray, colour: ColourSpace | None = None
    ) -> "DecodedFrame":
        return replace(self, y=y, u=u, v=v, colour=colour or self.colour)

    def same_pixels(self, other: "DecodedFrame") -> bool:
        return all(np.array_equal(a, b) for a, b in zip(self.planes, other.planes))

    @property
    def time(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)
