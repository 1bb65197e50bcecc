"""The unit that travels between media and restoration."""
from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np


@dataclass(slots=True)
class DecodedFrame:
    """One decoded picture.

    ``image`` is H x W x 3 BGR uint8 (OpenCV order, what the face code uses).
    ``is_keyframe`` comes from the decoder's picture type or the packet flags,
    never from the frame number.
    """

    image: np.ndarray
    pts: int | None
    time_base: Fraction | None
    is_keyframe: bool
    index: int = 0

    def with_image(self, image: np.ndarray) -> "DecodedFrame":
        return replace(self, image=image)

    @property
    def time(self) -> float | None:
        if self.pts is None or self.time_base is None:
            return None
        return float(self.pts * self.time_base)
