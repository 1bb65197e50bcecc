"""Lining the MLS-warped keyframe up with the compressed crop by dense optical flow.

The MLS warp is exact at the 68 landmarks only: between them (cheeks, hair, the
inside of the mouth) and wherever the expression changed since the keyframe, the
keyframe's pixels land a few pixels from where the compressed crop has them. On the
validation persons' crops the MLS-warped keyframe is 20.5-22.2 dB from the target;
refined along the optical flow from the compressed crop to it, 26.1-26.9 dB. A model
trained on refined references says so in its file (``reference_flow``), and is fed
refined references at run time too: one trained on the plain warp gains nothing from
them.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal, get_args

import cv2
import numpy as np

from kfgan_daemon.errors import ModelError

# Ways to refine a reference a model file (or a training configuration) may name; DIS at
# OpenCV's "fast" preset costs about 2 ms per 256 x 256 crop on one thread, remap included.
ReferenceFlow = Literal["dis-fast"]
REFERENCE_FLOWS: tuple[str, ...] = get_args(ReferenceFlow)


def check_reference_flow(name: str | None, origin: str) -> str | None:
    if name is not None and name not in REFERENCE_FLOWS:
        raise ModelError(f"{origin}: reference_flow {name!r} is not one of {', '.join(REFERENCE_FLOWS)}")
    return name


def refine_reference(compressed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``reference`` resampled along the DIS optical flow from ``compressed`` to it.

    Both are H x W x 3 uint8 RGB crops on the same grid; each output pixel is the
    reference's pixel where the flow says the compressed crop's content sits in it.
    """
    height, width = compressed.shape[:2]
    flow = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST).calc(
        cv2.cvtColor(compressed, cv2.COLOR_RGB2GRAY), cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY), None
    )
    grid_x, grid_y = _grid(height, width)
    return cv2.remap(
        reference, cv2.add(grid_x, flow[..., 0]), cv2.add(grid_y, flow[..., 1]), cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )


def refined_references(compressed: list[np.ndarray], references: list[np.ndarray], flow: str | None) -> list[np.ndarray]:
    """The references a model with ``flow`` (a :data:`REFERENCE_FLOWS` name, or None) is fed."""
    if flow is None:
        return references
    return [refine_reference(c, r) for c, r in zip(compressed, references, strict=True)]


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    xs.flags.writeable = False
    ys.flags.writeable = False
    return xs, ys
