"""Putting a restored crop back into its frame, in the frame's own YUV planes.

Only the pixels under the paste mask change; everything else keeps its decoded
value bit for bit. Two ways to paste (``PasteMode``):

- ``"correction"`` (default): the generator's correction, restored minus
  compressed crop, is warped back and added to the frame's native pixels. A face
  larger than the crop keeps its own detail, and what the generator left alone
  stays exactly as it was. A model with a native detail filter also filters the
  detail band such a face has beyond the crop's resolution (see
  :mod:`kfgan_daemon.face.native_detail`).
- ``"replace"``: the restored crop itself is warped back and blended in, as the
  published code does (for parity).

Two masks (``MaskShape``), both computed inside the crop's footprint only:

- ``"continuous"`` (default): a smooth ramp on the distance, in frame pixels,
  from the footprint's edge; its inset and width grow continuously with the face
  size, so the mask never jumps between frames as the face moves.
- ``"published"``: a warped mask of ones eroded by 2x2 and then by a square of
  side 2 * (sqrt(face area) // 20), blurred with a Gaussian of that side + 1; its
  size jumps in whole pixels as the face size crosses multiples of 20.

Blending happens in YUV: ``out = in + w * (face - in)`` (replace) or
``out = in + w * correction`` (correction), Y at full resolution, U and V at half
resolution with the 2x2 box average; a weight of 0 leaves the sample unchanged.
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import cv2
import numpy as np

from kfgan_daemon.face.align import crop_footprint, region_matrix
from kfgan_daemon.face.native_detail import NativeDetailFilter, band_strength, native_band
from kfgan_daemon.media.colour import Box, add_to_region, blend_region, chroma_box, rgb_delta_to_yuv
from kfgan_daemon.media.frame import DecodedFrame

PasteMode = Literal["correction", "replace"]
MaskShape = Literal["continuous", "published"]
PASTE_MODES: tuple[str, ...] = get_args(PasteMode)
MASK_SHAPES: tuple[str, ...] = get_args(MaskShape)

# Pixels of margin around the crop's footprint: the mask must be zero on the rectangle's
# inner edges so that erosion and blur there see what they would see on the full frame.
_MARGIN = 2
# Luma region coordinates -> chroma sample coordinates: a chroma sample stands for
# its 2x2 block, whose centre is at luma (2i + 0.5, 2j + 0.5).
_TO_CHROMA_GRID = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])


def crop_scale(matrix: np.ndarray) -> float:
    """Crop pixels per frame pixel of a similarity transform (below 1: the face is larger than the crop)."""
    (a, b, _), (c, d, _) = np.asarray(matrix, dtype=np.float64).tolist()
    return math.sqrt(abs(a * d - b * c))


def _region_inverse(matrix: np.ndarray, box: Box) -> np.ndarray:
    """Crop -> region (the box's pixels) transform."""
    inverse = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    inverse[0, 2] -= box[0]
    inverse[1, 2] -= box[1]
    return inverse


def continuous_mask(matrix: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """float32 weights over the crop (crop pixels): 0 at its edge, rising to 1 inside it.

    The ramp is a smoothstep on the distance to the crop's edge measured in frame
    pixels, centred ``e = sqrt(face area) / 20 + 1`` inside the edge and
    ``4 * sigma`` wide with ``sigma = 0.3 * (e - 2) + 0.8``: the inset and softness of
    the published mask (erosion by ``e``, a Gaussian of that sigma), as continuous
    functions of the face size. It is computed at crop size and warped with the crop.
    """
    crop_h, crop_w = crop_size
    scale = crop_scale(matrix)
    edge = math.sqrt(crop_w * crop_h) / scale / 20.0
    sigma = 0.3 * (edge - 1.0) + 0.8
    start, width = edge + 1.0 - 2.0 * sigma, 4.0 * sigma
    # Distance of each crop pixel centre to the nearest edge, converted to frame pixels.
    xs = np.arange(crop_w, dtype=np.float32)
    ys = np.arange(crop_h, dtype=np.float32)
    to_x = np.minimum(xs, crop_w - xs) / np.float32(scale)
    to_y = np.minimum(ys, crop_h - ys) / np.float32(scale)
    ramp = lambda d: np.clip((d - np.float32(start)) / np.float32(width), 0.0, 1.0)  # noqa: E731
    # The distance to the nearest edge is the smaller of the two separable ones; the ramp is monotonic.
    t = np.minimum.outer(ramp(to_y), ramp(to_x))
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def paste_weights(
    matrix: np.ndarray,
    crop_size: tuple[int, int],
    box: Box,
    mask: MaskShape = "continuous",
    face_area: float | None = None,
) -> np.ndarray:
    """float32 weights over the frame rectangle ``box`` (see :func:`kfgan_daemon.face.crop_footprint`)."""
    if mask == "published":
        return published_mask(matrix, crop_size, box, face_area)
    size = (box[2] - box[0], box[3] - box[1])
    inverse = _region_inverse(matrix, box)
    return cv2.warpAffine(continuous_mask(matrix, crop_size), inverse, size, flags=cv2.INTER_LINEAR)


def published_mask(
    matrix: np.ndarray, crop_size: tuple[int, int], box: Box, face_area: float | None = None
) -> np.ndarray:
    """float32 weights over ``box`` with the published erosion and blur (``soft * mask``).

    ``face_area`` overrides the area (frame pixels) that sets erosion and blur; by
    default it is the area of the eroded, warped mask, as in the published code.
    """
    size = (box[2] - box[0], box[3] - box[1])
    mask = cv2.warpAffine(
        np.ones(crop_size, dtype=np.float32), _region_inverse(matrix, box), size, flags=cv2.INTER_LINEAR
    )
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    area = float(mask.sum()) if face_area is None else float(face_area)
    side = 2 * (int(math.sqrt(max(area, 0.0))) // 20)
    if side == 0:
        return cv2.multiply(mask, mask)
    soft = cv2.erode(mask, np.ones((side, side), np.uint8))
    soft = cv2.GaussianBlur(soft, (side + 1, side + 1), 0)
    return cv2.multiply(soft, mask)


def paste_box(matrix: np.ndarray, crop_size: tuple[int, int], width: int, height: int) -> Box | None:
    """The even frame rectangle :func:`paste_face` may change (None: the crop lies outside the frame)."""
    return crop_footprint(matrix, crop_size, width, height, margin=_MARGIN)


def frame_band(frame: DecodedFrame, matrix: np.ndarray, crop_size: tuple[int, int], box: Box) -> np.ndarray:
    """The native band of ``frame``'s luma over ``box`` for a crop aligned by ``matrix``
    (see :func:`kfgan_daemon.face.native_detail.native_band`)."""
    x0, y0, x1, y1 = box
    return native_band(frame.y[y0:y1, x0:x1], region_matrix(matrix, box), _region_inverse(matrix, box), crop_size)


def native_detail_delta(
    frame: DecodedFrame, matrix: np.ndarray, crop_size: tuple[int, int], native_detail: NativeDetailFilter | None
) -> np.ndarray | None:
    """What ``native_detail`` changes in ``frame``'s luma over the paste box (float32), for
    :func:`paste_face`'s ``luma_detail``; None without a filter or for a face no larger than the
    crop. Only luma: a face's chroma, at half resolution, outgrows the crop only at twice the size."""
    if native_detail is None:
        return None
    strength = band_strength(crop_scale(matrix))
    box = paste_box(matrix, crop_size, frame.width, frame.height)
    if strength == 0.0 or box is None:
        return None
    band = frame_band(frame, matrix, crop_size, box)
    return cv2.multiply(cv2.subtract(native_detail(band), band), strength)


def paste_face(
    frame: DecodedFrame,
    restored: np.ndarray,
    matrix: np.ndarray,
    *,
    compressed: np.ndarray | None = None,
    mode: PasteMode = "correction",
    mask: MaskShape = "continuous",
    face_area: float | None = None,
    luma_detail: np.ndarray | None = None,
) -> DecodedFrame:
    """A copy of ``frame`` with the restored RGB crop (aligned by ``matrix``, frame -> crop) pasted in.

    ``compressed`` is the RGB crop the generator was given; ``"correction"`` needs it.
    ``face_area`` applies to the published mask only (see :func:`published_mask`).
    ``luma_detail`` (correction only) is a further luma change over the paste box, added
    under the same mask: the model's native detail filter (:func:`native_detail_delta`).
    """
    if restored.ndim != 3 or restored.shape[2] != 3:
        raise ValueError(f"paste_face needs an HxWx3 RGB crop, got shape {restored.shape}")
    if mode == "correction" and (compressed is None or compressed.shape != restored.shape):
        raise ValueError("paste mode 'correction' needs the compressed crop, the size of the restored one")
    if mode == "replace" and luma_detail is not None:
        raise ValueError("luma_detail is added by the correction paste only; the replace paste drops the native band")
    out = frame.copy()
    crop_size = restored.shape[:2]
    box = paste_box(matrix, crop_size, frame.width, frame.height)
    if box is None:
        return out
    size = (box[2] - box[0], box[3] - box[1])
    inverse = _region_inverse(matrix, box)
    if mode == "replace":
        weight = paste_weights(matrix, crop_size, box, mask, face_area)
        # Four channels warp about twice as fast as three.
        rgba = cv2.cvtColor(restored, cv2.COLOR_RGB2RGBA)
        face = cv2.warpAffine(rgba, inverse, size, flags=cv2.INTER_LINEAR)[:, :, :3]
        blend_region(out.y, out.u, out.v, box, face, weight, frame.colour)
        return out
    assert compressed is not None
    # The correction is linear in RGB, so it becomes a YUV difference before warping:
    # Y at luma resolution, U and V straight onto the chroma grid. (One channel per
    # warp: OpenCV's two- and three-channel float warps are several times slower.)
    change = cv2.subtract(restored.astype(np.float32), compressed.astype(np.float32))
    correction = rgb_delta_to_yuv(change, frame.colour)
    delta_y, delta_u, delta_v = cv2.split(correction)
    delta_y = cv2.warpAffine(delta_y, inverse, size, flags=cv2.INTER_LINEAR)
    if luma_detail is not None:
        if luma_detail.shape != delta_y.shape:
            raise ValueError(f"luma_detail is {luma_detail.shape}, the paste box {delta_y.shape}")
        delta_y = cv2.add(delta_y, luma_detail)
    weight = paste_weights(matrix, crop_size, box, mask, face_area)
    cbox = chroma_box(box)
    to_chroma = _TO_CHROMA_GRID @ np.vstack([inverse, [0.0, 0.0, 1.0]])
    chroma_size = (cbox[2] - cbox[0], cbox[3] - cbox[1])
    delta_u, delta_v = (
        cv2.warpAffine(delta, to_chroma, chroma_size, flags=cv2.INTER_LINEAR) for delta in (delta_u, delta_v)
    )
    add_to_region(out.y, out.u, out.v, box, (delta_y, delta_u, delta_v), weight)
    return out
