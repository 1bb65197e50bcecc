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
    # "subpixel" keeps the eye centres fractional so the crop follows the face smoothly;
    # "published" casts them to int as the authors' code does (for parity).
    alignment: Literal["subpixel", "published"] = "subpixel"
    # One Euro filter on the landmarks the restorer uses (see face.smoothing); off: raw landmarks.
    smooth_landmarks: bool = True
    smoothing_min_cutoff: float = 1.0
    smoothing_beta: float = 10.0
    # The keyframe store is emptied when the face has been gone for longer than this (seconds
    # of stream time), or when a detected face's dlib descriptor is further than
    # identity_distance from the store's person (0.6 is dlib's same-person threshold).
    identity_lost_seconds: float = 2.0
    identity_check: bool = True
    identity_distance: float = 0.6
    descriptor_path: Path | None = None
    # "correction" adds the generator's change (restored minus compressed crop) to the frame's
    # own pixels, so a face larger than the crop keeps its detail; "replace" pastes the
    # restored crop itself, as the published code does (for parity).
    paste_mode: Literal["correction", "replace"] = "correction"
    # "continuous": a paste mask whose inset and softness follow the face size smoothly;
    # "published": the authors' integer erosion and blur, which jump as the face size changes.
    paste_mask: Literal["continuous", "published"] = "continuous"
    # Where the decoder repeated a pixel of the previous frame exactly (a skipped block) and the
    # paste changes it, the output moves this fraction of the way from the previous output towards
    # the fresh restoration (see restore.repeats): a face the codec kept still stays still.
    # 1: every frame's restoration is used as it comes.
    repeat_update: float = 0.25
    # A frame the live engine cannot restore in time gets the last restored frame's correction,
    # moved with the face, if that frame is at most this many seconds of stream time older.
    carry_forward_seconds: float = 0.5
