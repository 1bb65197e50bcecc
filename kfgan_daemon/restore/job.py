"""What one face hands to the generator, and what the generator hands back."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class FaceJob:
    """One aligned face ready for the generator.

    All images are 256x256x3 uint8 in BGR order; ``matrix`` maps frame
    coordinates to crop coordinates and is what paste-back inverts.
    """

    compressed: np.ndarray
    reference: np.ndarray
    landmark_image: np.ndarray
    matrix: np.ndarray
    crop_landmarks: np.ndarray
    key_id: int
