"""Affine Moving Least Squares image deformation (Schaefer et al. 2006), alpha = 1.

The warp is an inverse map: for every output pixel v the MLS affine transform fitted
to the control points around v (weights 1 / |dst_i - v|^2) says where in the source
image to sample. Two samplings of that map:

- "published": the map on the full pixel grid, truncated to integers and clamped to
  the image, nearest-pixel lookup; this is what the published checkpoint was trained
  with (matches the reference fixture pixel for pixel).
- "fast": the map on a coarse grid of block centres, upsampled bilinearly and sampled
  bilinearly with cv2.remap; about two orders of magnitude cheaper and smoother.

The map is computed as a displacement from the identity, so that equal source and
destination landmarks give exactly the identity even after truncation.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

import cv2
import numpy as np

WarpMode = Literal["fast", "published"]
WARP_MODES: tuple[str, ...] = get_args(WarpMode)
FAST_GRID_STEP = 8
# Squared distances below this count as "the pixel is the control point": the MLS map's
# limit there is the control point's own destination, and 1/d^2 would overflow.
_COINCIDENT_D2 = 1e-10
_PUBLISHED_ROWS_PER_CHUNK = 32


def mls_displacement(
    dst_points: np.ndarray, src_points: np.ndarray, xs: np.ndarray, ys: np.ndarray
) -> np.ndarray:
    """MLS inverse-map displacement at the grid xs x ys: an len(ys) x len(xs) x 2 float64 array.

    `dst_points` are the control points in output coordinates, `src_points` where each
    of them comes from; the source position of output pixel (x, y) is (x, y) + result[y, x].
    """
    dst = np.asarray(dst_points, dtype=np.float64)
    src = np.asarray(src_points, dtype=np.float64)
    if dst.ndim != 2 or dst.shape[1] != 2 or dst.shape != src.shape or len(dst) < 3:
        raise ValueError(f"MLS needs matching Nx2 control points (N >= 3), got {dst.shape} and {src.shape}")
    # Work about the control points' centroid: moments of small numbers lose less precision.
    origin = dst.mean(axis=0)
    p = dst - origin
    delta = src - dst
    vx, vy = np.meshgrid(np.asarray(xs, dtype=np.float64) - origin[0], np.asarray(ys, dtype=np.float64) - origin[1])
    v = np.stack([vx.ravel(), vy.ravel()], axis=1)

    d2 = (v[:, 0:1] - p[:, 0]) ** 2 + (v[:, 1:2] - p[:, 1]) ** 2
    coincident = d2 < _COINCIDENT_D2
    hit_rows = np.flatnonzero(coincident.any(axis=1))
    if hit_rows.size:
        d2[coincident] = 1.0
    w = 1.0 / d2

    total = w.sum(axis=1)
    # einsum rather than a BLAS product: for these shapes OpenBLAS's threads make w @ x
    # ten times slower (and erratic) on a busy 2-core machine.
    columns = np.stack(
        [
            p[:, 0],
            p[:, 1],
            delta[:, 0],
            delta[:, 1],
            p[:, 0] * p[:, 0],
            p[:, 0] * p[:, 1],
            p[:, 1] * p[:, 1],
            p[:, 0] * delta[:, 0],
            p[:, 0] * delta[:, 1],
            p[:, 1] * delta[:, 0],
            p[:, 1] * delta[:, 1],
        ]
    )
    sums = np.einsum("ij,kj->ki", w, columns)
    p_star = sums[0:2].T / total[:, None]
    delta_star = sums[2:4].T / total[:, None]
    # A = sum_i w_i p^_i^T p^_i and E = B - A = sum_i w_i p^_i^T (q^_i - p^_i), from raw moments.
    weighted = total[:, None]
    a, b, c = (sums[4:7].T - weighted * p_star[:, [0, 0, 1]] * p_star[:, [0, 1, 1]]).T
    e00, e01, e10, e11 = (sums[7:11].T - weighted * p_star[:, [0, 0, 1, 1]] * delta_star[:, [0, 1, 0, 1]]).T
    det = a * c - b * b
    # Collinear control points leave the linear part undetermined: fall back to translation.
    degenerate = np.abs(det) <= 1e-12 * np.maximum(a * c, 1e-300)
    inv_det = np.where(degenerate, 0.0, 1.0 / np.where(degenerate, 1.0, det))
    m00 = (c * e00 - b * e10) * inv_det
    m01 = (c * e01 - b * e11) * inv_det
    m10 = (a * e10 - b * e00) * inv_det
    m11 = (a * e11 - b * e01) * inv_det
    rx = v[:, 0] - p_star[:, 0]
    ry = v[:, 1] - p_star[:, 1]
    displacement = np.empty_like(v)
    displacement[:, 0] = rx * m00 + ry * m10 + delta_star[:, 0]
    displacement[:, 1] = rx * m01 + ry * m11 + delta_star[:, 1]

    for row in hit_rows:
        # The map's limit at a control point is its destination (the mean over duplicates).
        displacement[row] = delta[coincident[row]].mean(axis=0)
    return displacement.reshape(len(ys), len(xs), 2)


def _published_warp(image: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    xs = np.arange(width, dtype=np.float64)
    out = np.empty_like(image)
    for top in range(0, height, _PUBLISHED_ROWS_PER_CHUNK):
        ys = np.arange(top, min(top + _PUBLISHED_ROWS_PER_CHUNK, height), dtype=np.float64)
        displacement = mls_displacement(dst, src, xs, ys)
        src_x = (xs[None, :] + displacement[..., 0]).astype(np.int64)
        src_y = (ys[:, None] + displacement[..., 1]).astype(np.int64)
        np.clip(src_x, 0, width - 1, out=src_x)
        np.clip(src_y, 0, height - 1, out=src_y)
        out[top : top + len(ys)] = image[src_y, src_x]
    return out


@lru_cache(maxsize=8)
def _identity_grid(height: int, width: int) -> np.ndarray:
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    grid = np.stack([xs, ys], axis=2)
    grid.flags.writeable = False
    return grid


def _fast_warp(image: np.ndarray, src: np.ndarray, dst: np.ndarray, step: int) -> np.ndarray:
    height, width = image.shape[:2]
    cells_x = -(-width // step)
    cells_y = -(-height // step)
    # Sample at block centres: cv2.resize (INTER_LINEAR) maps output pixel i to input
    # coordinate (i + 0.5) / step - 0.5, so these samples land exactly on their pixels.
    xs = (np.arange(cells_x) + 0.5) * step - 0.5
    ys = (np.arange(cells_y) + 0.5) * step - 0.5
    coarse = mls_displacement(dst, src, xs, ys).astype(np.float32)
    # Upsampling the displacement (not the map) keeps the border extrapolation harmless.
    dense = cv2.resize(coarse, (cells_x * step, cells_y * step), interpolation=cv2.INTER_LINEAR)
    dense = dense[:height, :width]
    dense += _identity_grid(height, width)
    return cv2.remap(image, dense, None, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def mls_warp(
    image: np.ndarray,
    src_landmarks: np.ndarray,
    dst_landmarks: np.ndarray,
    mode: WarpMode = "fast",
    grid_step: int = FAST_GRID_STEP,
) -> np.ndarray:
    """Warp `image`, whose landmarks are `src_landmarks`, so that they move to `dst_landmarks`.

    The output has the image's size and dtype. `grid_step` is the coarse grid spacing of
    the "fast" mode (ignored by "published").
    """
    src = np.asarray(src_landmarks, dtype=np.float64)
    dst = np.asarray(dst_landmarks, dtype=np.float64)
    if mode == "published":
        return _published_warp(image, src, dst)
    if mode == "fast":
        if grid_step < 1:
            raise ValueError(f"grid_step must be >= 1, got {grid_step}")
        return _fast_warp(image, src, dst, grid_step)
    raise ValueError(f"unknown MLS warp mode {mode!r}; expected one of {WARP_MODES}")
