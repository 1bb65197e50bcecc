"""What one face hands to the generator, and what the generator hands back."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class FaceJob:
    """One aligned face ready for the generator.

    All images are 256x256x3 uint8 in RGB order (the generator's); ``matrix`` maps frame
    coordinates to crop coordinates and is what paste-back inverts.
    """

    compressed: np.ndarray
    reference: np.ndarray
    landmark_image: np.ndarray
    matrix: np.ndarray
    crop_landmarks: np.ndarray
    key_id: int
    # The restorer's store epoch when the job was built: it changes whenever the store
    # was emptied for a new person, so a key id is only meaningful within one epoch.
    store_epoch: int = 0
    # The frame's mean block quantiser as decoded (None: not reported): how much of the
    # model's correction it gets (model.quantiser_strength).
    quantiser: float | None = None
