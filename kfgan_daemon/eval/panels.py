"""Labelled panels side by side: the frames of a comparison video, and its snapshot picture.

Panels are joined in their own YUV planes (no colour conversion) under a black
caption bar that covers none of the picture: each panel's title and, below it, a
line of figures. The snapshot adds a second row in which every panel is
magnified around the face by a whole number (nearest neighbour, so that the
codec's blocks stay visibly blocks), and only the finished picture is converted to
RGB, by the one colour module, for the PNG. A picture whose panels are scaled down shows
the face in the frame's own pixels below them.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from kfgan_daemon.media.colour import Box
from kfgan_daemon.media.frame import DecodedFrame

_FONT = cv2.FONT_HERSHEY_SIMPLEX
# The title's and the figures' text height as a share of their half of the caption bar.
_TITLE_SIZE, _FIGURES_SIZE = 0.6, 0.5


@dataclass(frozen=True, slots=True)
class Panel:
    """One picture of a comparison: the frame, its title, and a line of figures (may be empty)."""

    frame: DecodedFrame
    title: str
    figures: str = ""


def caption_height(frame_height: int) -> int:
    """Rows of the caption bar above panels this tall: two lines of text, even for the chroma planes."""
    return max(32, frame_height // 10) & ~1


def join_panels(panels: Sequence[Panel], timing: DecodedFrame) -> DecodedFrame:
    """The panels left to right under their captions, with ``timing``'s pts, time base and colour tags."""
    if not panels:
        raise ValueError("no panels to join")
    sizes = {(panel.frame.width, panel.frame.height) for panel in panels}
    if len(sizes) != 1:
        raise ValueError(f"panels of different sizes cannot be joined: {sorted(sizes)}")
    width, height = sizes.pop()
    bar = caption_height(height)
    black, white = (0, 255) if timing.colour.full_range else (16, 235)
    caption = np.full((bar, width * len(panels)), black, np.uint8)
    for index, panel in enumerate(panels):
        _draw_caption(caption[:, index * width : (index + 1) * width], panel, white)
    y, u, v = (np.concatenate(same_plane, axis=1) for same_plane in zip(*(panel.frame.planes for panel in panels)))
    # Neutral chroma under the bar, so the caption is grey on every picture.
    neutral = np.full((bar // 2, u.shape[1]), 128, np.uint8)
    return timing.with_planes(np.vstack([caption, y]), np.vstack([neutral, u]), np.vstack([neutral, v]))


def _draw_caption(area: np.ndarray, panel: Panel, white: int) -> None:
    """The title on the upper half of ``area`` (a view into the bar's luma), the figures on the lower."""
    half = area.shape[0] // 2
    margin = max(4, half // 3)
    for row, (text, size) in enumerate(((panel.title, _TITLE_SIZE), (panel.figures, _FIGURES_SIZE))):
        if not text:
            continue
        thickness = max(1, half // 16)
        (text_width, text_height), _ = cv2.getTextSize(text, _FONT, 1.0, thickness)
        # As large as the line allows, shrunk to the panel's width for long figures.
        scale = min(size * half / text_height, (area.shape[1] - 2 * margin) / text_width)
        baseline = row * half + (half + int(round(text_height * scale))) // 2
        cv2.putText(area, text, (margin, baseline), _FONT, scale, white, thickness, cv2.LINE_AA)


def magnification(box: Box, width: int, height: int, least: int = 2) -> int:
    """The largest whole-number zoom at which the face box still fits a panel of ``width`` x ``height``,
    at least ``least``."""
    x0, y0, x1, y1 = box
    return max(least, int(min(width / max(1, x1 - x0), height / max(1, y1 - y0))))


def magnified(frame: DecodedFrame, box: Box, zoom: int, size: tuple[int, int]) -> DecodedFrame:
    """The frame's neighbourhood of ``box`` enlarged ``zoom`` times by pixel repetition, ``size`` (w, h) large.

    The region is ``size`` over ``zoom``, centred on the box and kept inside the
    frame, on even coordinates so that the chroma planes follow it exactly.
    """
    width, height = size
    region_w = min(frame.width, width // zoom) & ~1
    region_h = min(frame.height, height // zoom) & ~1
    centre_x, centre_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    left = int(np.clip(round(centre_x - region_w / 2), 0, frame.width - region_w)) & ~1
    top = int(np.clip(round(centre_y - region_h / 2), 0, frame.height - region_h)) & ~1
    planes = []
    for plane, step in zip(frame.planes, (1, 2, 2)):
        region = plane[top // step : (top + region_h) // step, left // step : (left + region_w) // step]
        grown = np.repeat(np.repeat(region, zoom, axis=0), zoom, axis=1)
        # The rows and columns a whole-number zoom cannot reach repeat the region's edge.
        target = (-(-height // step), -(-width // step))
        missing = [(0, max(0, want - have)) for want, have in zip(target, grown.shape)]
        padded = np.pad(grown, missing, mode="edge")
        planes.append(padded[: target[0], : target[1]])
    return frame.with_planes(*planes)


def scaled(frame: DecodedFrame, width: int) -> DecodedFrame:
    """The frame at ``width`` (height in proportion, both even), each plane area-averaged on its own."""
    if width == frame.width:
        return frame
    height = max(2, round(frame.height * width / frame.width)) & ~1
    sizes = ((width, height), (width // 2, height // 2), (width // 2, height // 2))
    return frame.with_planes(
        *(cv2.resize(plane, size, interpolation=cv2.INTER_AREA) for plane, size in zip(frame.planes, sizes))
    )


def snapshot_picture(panels: Sequence[Panel], box: Box | None, width: int | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB: the captioned panels and, under them, each magnified around the face ``box``.

    ``width`` is each panel's width in the picture (default: the frame's). The upper row
    is scaled to it; the lower one is cut from the frame's own pixels, each repeated a
    whole number of times, and shows the face at least twice as large as the upper row.
    """
    frame = panels[0].frame
    width = frame.width if width is None else width & ~1
    small = [Panel(scaled(panel.frame, width), panel.title, panel.figures) for panel in panels]
    top = join_panels(small, timing=small[0].frame)
    if box is None:
        return top.rgb()
    size = (width, small[0].frame.height)
    zoom = magnification(box, *size, least=max(1, math.ceil(2 * width / frame.width)))
    zoomed = "face at actual size" if zoom == 1 else f"face x{zoom}"
    closer = [Panel(magnified(panel.frame, box, zoom, size), f"{panel.title}, {zoomed}") for panel in panels]
    return np.vstack([top.rgb(), join_panels(closer, timing=closer[0].frame).rgb()])
