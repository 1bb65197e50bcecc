"""Keeping the restoration of pixels the codec repeated from the previous frame.

A P-frame copies much of a talking head unchanged from the frame before (skipped
blocks): those decoded pixels are bit-identical from one frame to the next, and
so is their error against the original. A restoration decided afresh for every
frame changes them anyway, by a little noise and by the crop moving a fraction
of a pixel with the landmarks: on a face the codec kept still, that shows as
shimmer the input did not have (the "face flicker" that ``eval`` measures).

So where the input pixel equals the previous frame's and the paste changed it,
the output moves only ``update`` of the way from the previous output towards the
fresh restoration: an exponential average over the run of repeated frames, which
also averages the generator's noise away. Pixels the paste left alone are never
touched, so everything outside the paste mask stays bit-identical to the input.
It applies only when the previous output was of the frame just before (by decode
index), in the same stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from kfgan_daemon.media.colour import Box, chroma_box
from kfgan_daemon.media.frame import DecodedFrame


@dataclass(frozen=True, slots=True)
class EmittedFrame:
    """A frame as it arrived and as it left."""

    input: DecodedFrame
    output: DecodedFrame


def settle_repeated_pixels(
    frame: DecodedFrame, fresh: DecodedFrame, previous: EmittedFrame | None, box: Box | None, update: float
) -> DecodedFrame:
    """``fresh`` (a restoration of ``frame`` that changed pixels only inside ``box``) with its
    repeated pixels settled as the module describes; ``fresh`` itself when nothing applies.

    ``fresh`` must be a restorer's own copy: it is modified in place.
    """
    if (
        previous is None
        or box is None
        or update >= 1.0
        or previous.input.index != frame.index - 1
        or previous.input.y.shape != frame.y.shape
    ):
        return fresh
    cbox = chroma_box(box)
    planes = (
        (frame.y, fresh.y, previous.input.y, previous.output.y, box),
        (frame.u, fresh.u, previous.input.u, previous.output.u, cbox),
        (frame.v, fresh.v, previous.input.v, previous.output.v, cbox),
    )
    for now, out, before, before_out, (x0, y0, x1, y1) in planes:
        region = (slice(y0, y1), slice(x0, x1))
        source, restored = now[region], out[region]
        # Whole-region OpenCV passes: numpy's boolean indexing or masked copy cost 30 times more.
        repeated = cv2.bitwise_and(
            cv2.compare(source, before[region], cv2.CMP_EQ), cv2.compare(restored, source, cv2.CMP_NE)
        )
        settled = cv2.addWeighted(before_out[region], 1.0 - update, restored, update, 0.0)
        written = cv2.copyTo(settled, repeated, restored)
        if not np.shares_memory(written, restored):
            restored[...] = written
    return fresh
