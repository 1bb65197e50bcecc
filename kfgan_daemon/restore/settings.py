"""Per-stream restoration settings (plain data; the service validates them at its edge)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True, slots=True)
class RestoreSettings:
    detector: Literal["hog", "cnn"] = "hog"
    redetect_interval: int = 15
    keyframe_store_size: int = 10
    keyframe_policy: Literal["lfu", "max_distance"] = "lfu"
    warp_mode: Literal["fast", "published"] = "fast"
    # Root-mean-square landmark distance (crop pixels) between the current face and the
    # nearest stored keyframe above which the store cannot help this pose; the WebRTC
    # path then asks the sender for a fresh I-frame (PLI).
    pli_distance_threshold: float = 8.0
    predictor_path: Path | None = None
    detector_path: Path | None = None
