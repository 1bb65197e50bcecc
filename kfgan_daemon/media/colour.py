"""Every colour conversion of the project: YUV 4:2:0 planes <-> RGB, exactly.

Pictures travel as the decoder made them (yuv420p planes); only the region a
face occupies is converted to RGB, and only the pixels under the paste mask are
written back. Conversions use the stream's own matrix (BT.601 or BT.709) and
range in floating point and round to nearest, so that YUV -> RGB -> YUV of
in-gamut content returns the same levels (signed mean error well under 0.05,
never more than 1). Chroma is replicated on the way up and 2x2 box-averaged on
the way down, which makes the two directions inverses of each other.

Rectangles are ``(x0, y0, x1, y1)`` in luma pixels, half-open, with even
corners so that they cover whole chroma samples (see :func:`even_box`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

Matrix = Literal["bt601", "bt709"]
Box = tuple[int, int, int, int]

# AVColorSpace / AVColorPrimaries / AVColorTransferCharacteristic / AVColorRange
# values (libavutil/pixfmt.h) as PyAV exposes them on frames and codec contexts.
_AVCOL_SPC_BT709 = 1
_AVCOL_SPC_BT470BG = 5
_AVCOL_SPC_SMPTE170M = 6
_AVCOL_UNSPECIFIED = 2
_AVCOL_RANGE_MPEG = 1
_AVCOL_RANGE_JPEG = 2
_MATRIX_TAGS = {"bt709": _AVCOL_SPC_BT709, "bt601": _AVCOL_SPC_SMPTE170M}
# The primaries and transfer usually paired with each matrix (BT.709; SMPTE 170M).
_USUAL_PRIMARIES = {"bt709": 1, "bt601": 6}
_USUAL_TRANSFER = {"bt709": 1, "bt601": 6}
# Kr, Kb of each matrix.
_WEIGHTS = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
# FFmpeg's convention for untagged video: HD (720 lines and more) is BT.709.
_HD_LINES = 720


@dataclass(frozen=True, slots=True)
class ColourSpace:
    """The YUV <-> RGB relation of a stream: matrix and range.

    ``primaries`` and ``transfer`` are the input's own tags, carried only so that
    outputs repeat them; they play no part in conversions or comparisons.
    """

    matrix: Matrix = "bt601"
    full_range: bool = False
    primaries: int | None = field(default=None, compare=False)
    transfer: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.matrix not in _WEIGHTS:
            raise ValueError(f"colour matrix must be one of {sorted(_WEIGHTS)}, not {self.matrix!r}")

    @classmethod
    def of(cls, tagged: object, height: int | None = None, fallback: "ColourSpace | None" = None) -> "ColourSpace":
        """The colour space an ``av.VideoFrame`` or video codec context is tagged with.

        What is untagged comes from ``fallback`` (a picture's stream), else the
        FFmpeg convention: BT.601 below 720 lines, BT.709 from 720 lines, limited
        range unless the pixel format is a ``yuvj`` one.
        """
        code = int(getattr(tagged, "colorspace", _AVCOL_UNSPECIFIED) or _AVCOL_UNSPECIFIED)
        if code == _AVCOL_SPC_BT709:
            matrix: Matrix = "bt709"
        elif code in (_AVCOL_SPC_BT470BG, _AVCOL_SPC_SMPTE170M):
            matrix = "bt601"
        elif fallback is not None:
            matrix = fallback.matrix
        else:
            lines = height if height is not None else int(getattr(tagged, "height", 0) or 0)
            matrix = "bt709" if lines >= _HD_LINES else "bt601"
        pix_fmt = getattr(tagged, "format", None) or getattr(tagged, "pix_fmt", None)
        pix_name = str(getattr(pix_fmt, "name", pix_fmt) or "")
        range_code = int(getattr(tagged, "color_range", 0) or 0)
        if range_code in (_AVCOL_RANGE_MPEG, _AVCOL_RANGE_JPEG) or pix_name.startswith("yuvj") or fallback is None:
            full_range = range_code == _AVCOL_RANGE_JPEG or pix_name.startswith("yuvj")
        else:
            full_range = fallback.full_range
        primaries = int(getattr(tagged, "color_primaries", _AVCOL_UNSPECIFIED) or _AVCOL_UNSPECIFIED)
        transfer = int(getattr(tagged, "color_trc", _AVCOL_UNSPECIFIED) or _AVCOL_UNSPECIFIED)
        return cls(
            matrix,
            full_range,
            primaries if primaries != _AVCOL_UNSPECIFIED else (fallback.primaries if fallback else None),
            transfer if transfer != _AVCOL_UNSPECIFIED else (fallback.transfer if fallback else None),
        )

    @classmethod
    def untagged(cls, height: int) -> "ColourSpace":
        """What players assume for untagged video of ``height`` lines (FFmpeg: BT.709 from 720 lines)."""
        return cls("bt709" if height >= _HD_LINES else "bt601")

    def tag(self, target: object) -> None:
        """Write matrix, range, primaries and transfer into an ``av.VideoFrame`` or codec context."""
        target.colorspace = _MATRIX_TAGS[self.matrix]  # type: ignore[attr-defined]
        target.color_range = _AVCOL_RANGE_JPEG if self.full_range else _AVCOL_RANGE_MPEG  # type: ignore[attr-defined]
        target.color_primaries = self.primaries or _USUAL_PRIMARIES[self.matrix]  # type: ignore[attr-defined]
        target.color_trc = self.transfer or _USUAL_TRANSFER[self.matrix]  # type: ignore[attr-defined]

    @property
    def y4m_tags(self) -> str:
        """The YUV4MPEG2 header's range tag (FFmpeg reads ``XCOLORRANGE``)."""
        return "XCOLORRANGE=FULL" if self.full_range else "XCOLORRANGE=LIMITED"


@dataclass(frozen=True, slots=True)
class _Matrices:
    to_rgb: np.ndarray  # 3x4: RGB = M @ (Y, U, V, 1)
    to_yuv: np.ndarray  # 3x4: (Y, U, V) = M @ (R, G, B, 1)


def _build(space: ColourSpace) -> _Matrices:
    kr, kb = _WEIGHTS[space.matrix]
    kg = 1.0 - kr - kb
    # Y' in [0, 1], Pb/Pr in [-0.5, 0.5] from R'G'B' in [0, 1].
    rgb_to_ypbpr = np.array(
        [
            [kr, kg, kb],
            [-0.5 * kr / (1 - kb), -0.5 * kg / (1 - kb), 0.5],
            [0.5, -0.5 * kg / (1 - kr), -0.5 * kb / (1 - kr)],
        ]
    )
    if space.full_range:
        scale = np.array([255.0, 255.0, 255.0])
        offset = np.array([0.0, 128.0, 128.0])
    else:
        scale = np.array([219.0, 224.0, 224.0])
        offset = np.array([16.0, 128.0, 128.0])
    # Levels from 8-bit RGB: rows scaled by the range, columns by 1/255.
    to_yuv_linear = rgb_to_ypbpr * scale[:, None] / 255.0
    to_rgb_linear = np.linalg.inv(to_yuv_linear)
    to_yuv = np.hstack([to_yuv_linear, offset[:, None]])
    to_rgb = np.hstack([to_rgb_linear, (-to_rgb_linear @ offset)[:, None]])
    return _Matrices(to_rgb.astype(np.float32), to_yuv.astype(np.float32))


_CACHE: dict[tuple[str, bool], _Matrices] = {}


def _matrices(space: ColourSpace) -> _Matrices:
    key = (space.matrix, space.full_range)
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE[key] = _build(space)
    return found


def _round_u8(values: np.ndarray) -> np.ndarray:
    # Levels of 8-bit RGB through these matrices are never negative, and
    # convertScaleAbs rounds to nearest and saturates at 255 in one pass.
    return cv2.convertScaleAbs(values)


def _clip_negative(values: np.ndarray) -> np.ndarray:
    """Negative float levels set to 0 (the fastest clip OpenCV has)."""
    return cv2.threshold(values, 0.0, 0.0, cv2.THRESH_TOZERO)[1]


def upsample_chroma(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 4:2:0 chroma plane at luma size by replication (each sample covers its 2x2 block)."""
    up = cv2.resize(plane, (plane.shape[1] * 2, plane.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    return up[:height, :width]


def downsample_chroma(plane: np.ndarray) -> np.ndarray:
    """The 2x2 box average of a luma-sized float plane (odd edges repeat their last row/column)."""
    height, width = plane.shape[:2]
    if height % 2 or width % 2:
        plane = cv2.copyMakeBorder(plane, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
    return cv2.resize(plane, (plane.shape[1] // 2, plane.shape[0] // 2), interpolation=cv2.INTER_AREA)


def yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, space: ColourSpace) -> np.ndarray:
    """H x W x 3 uint8 RGB of yuv420p planes (``u``, ``v`` at half size, rounded up for odd sizes)."""
    height, width = y.shape
    yuv = cv2.merge([y, upsample_chroma(u, height, width), upsample_chroma(v, height, width)])
    # In float: cv2.transform on uint8 is fixed point and misses round-to-nearest by up to 0.1.
    rgb = cv2.transform(yuv.astype(np.float32), _matrices(space).to_rgb)
    # Out-of-gamut YUV gives negative levels, which convertScaleAbs would mirror.
    return _round_u8(_clip_negative(rgb))


def rgb_to_yuv_float(rgb: np.ndarray, space: ColourSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unrounded float32 levels of an RGB image: Y at full size, U and V 2x2 box-averaged.

    For blending: ``in + w * (face - in)`` rounds once, at the end.
    """
    matrices = _matrices(space)
    rgb_float = rgb.astype(np.float32, copy=False)
    y = cv2.transform(rgb_float, matrices.to_yuv[:1])
    # The matrix is linear, so averaging RGB first equals averaging U and V.
    chroma = cv2.transform(downsample_chroma(rgb_float), matrices.to_yuv[1:])
    u, v = cv2.split(chroma)
    return y, u, v


def rgb_to_yuv(rgb: np.ndarray, space: ColourSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """yuv420p planes (uint8) of an H x W x 3 uint8 RGB image, rounded to nearest."""
    y, u, v = rgb_to_yuv_float(rgb, space)
    return _round_u8(y), _round_u8(u), _round_u8(v)


def convert_planes(
    y: np.ndarray, u: np.ndarray, v: np.ndarray, source: ColourSpace, target: ColourSpace
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """yuv420p planes re-expressed in another matrix or range (through RGB, rounding once each way)."""
    if source == target:
        return y, u, v
    return rgb_to_yuv(yuv_to_rgb(y, u, v, source), target)


# -- regions ------------------------------------------------------------------------


def even_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """The smallest rectangle with even corners that holds ``(x0, y0)-(x1, y1)``, clipped to the frame.

    An odd frame size keeps its last column/row reachable (the clipped corner may be odd there).
    """
    left = max(0, int(np.floor(x0)) & ~1)
    top = max(0, int(np.floor(y0)) & ~1)
    right = min(width, int(np.ceil(x1)) + (int(np.ceil(x1)) & 1))
    bottom = min(height, int(np.ceil(y1)) + (int(np.ceil(y1)) & 1))
    return left, top, max(left, right), max(top, bottom)


def chroma_box(box: Box) -> Box:
    """The chroma-plane rectangle of an even luma rectangle."""
    x0, y0, x1, y1 = box
    return x0 // 2, y0 // 2, (x1 + 1) // 2, (y1 + 1) // 2


def region_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, box: Box, space: ColourSpace) -> np.ndarray:
    """RGB of the even rectangle ``box`` of yuv420p planes (the rest of the picture is not converted)."""
    x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = chroma_box(box)
    return yuv_to_rgb(y[y0:y1, x0:x1], u[cy0:cy1, cx0:cx1], v[cy0:cy1, cx0:cx1], space)


def rgb_delta_to_yuv(delta: np.ndarray, space: ColourSpace) -> np.ndarray:
    """A float32 H x W x 3 RGB difference as a (Y, U, V) difference (the matrix without its offset)."""
    return cv2.transform(delta.astype(np.float32, copy=False), _matrices(space).to_yuv[:, :3])


def _chroma_weight(weight: np.ndarray) -> np.ndarray:
    weight_c = downsample_chroma(weight)
    # A chroma sample beside the mask must stay exact even where float averaging leaves a residue.
    weight_c[weight_c < 1e-6] = 0.0
    return weight_c


def _write(plane: np.ndarray, box: Box, values: np.ndarray) -> None:
    x0, y0, x1, y1 = box
    plane[y0:y1, x0:x1] = _round_u8(values)


def blend_region(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    box: Box,
    rgb: np.ndarray,
    weight: np.ndarray,
    space: ColourSpace,
) -> None:
    """Blend ``rgb`` (the size of ``box``) into the planes in place, in YUV: ``in + w * (rgb - in)``.

    ``weight`` is float32 in [0, 1] at luma size of ``box``; chroma uses its 2x2
    box average. A pixel (or chroma sample) whose weight is 0 keeps its value bit for bit.
    """
    face_y, face_u, face_v = rgb_to_yuv_float(rgb, space)
    weight = weight.astype(np.float32, copy=False)
    weight_c = _chroma_weight(weight)
    cbox = chroma_box(box)
    for plane, face, w, region in ((y, face_y, weight, box), (u, face_u, weight_c, cbox), (v, face_v, weight_c, cbox)):
        x0, y0, x1, y1 = region
        current = plane[y0:y1, x0:x1].astype(np.float32)
        _write(plane, region, cv2.add(current, cv2.multiply(w, cv2.subtract(face, current))))


def add_to_region(
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    box: Box,
    deltas: tuple[np.ndarray, np.ndarray, np.ndarray],
    weight: np.ndarray,
) -> None:
    """Add weighted differences to the planes in place: Y += w * dY, U/V += box(w) * dU/dV.

    ``deltas`` are float32: dY at the luma size of ``box``, dU and dV at its chroma
    size; ``weight`` is float32 at the luma size. A sample whose weight is 0 keeps its
    value bit for bit.
    """
    weight = weight.astype(np.float32, copy=False)
    weight_c = _chroma_weight(weight)
    cbox = chroma_box(box)
    for plane, delta, w, region in zip((y, u, v), deltas, (weight, weight_c, weight_c), (box, cbox, cbox)):
        x0, y0, x1, y1 = region
        current = plane[y0:y1, x0:x1].astype(np.float32)
        cv2.accumulateProduct(w, delta.astype(np.float32, copy=False), current)
        # A correction can push a level below 0, which convertScaleAbs would mirror.
        _write(plane, region, _clip_negative(current))
