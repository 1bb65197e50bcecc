"""Per-stream restoration settings: plain data whose choices are checked once, here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from kfgan_daemon.errors import ConfigError
from kfgan_daemon.face.align import AlignmentMode
from kfgan_daemon.face.detector import DetectorKind
from kfgan_daemon.face.mls import WarpMode
from kfgan_daemon.face.paste import MaskShape, PasteMode
from kfgan_daemon.keyframes.store import KeyframePolicy


@dataclass(frozen=True, slots=True)
class RestoreSettings:
    """How one stream is restored. Every ``Literal`` field is checked on construction (a
    :class:`ConfigError` naming the field), so the face, keyframe and paste steps that act on
    these choices need not check them again; the service's config and the command line's typed
    choices reject a bad value earlier still, with the option's own name."""

    detector: DetectorKind = "hog"
    redetect_interval: int = 15
    keyframe_store_size: int = 10
    keyframe_policy: KeyframePolicy = "lfu"
    warp_mode: WarpMode = "fast"
    # Root-mean-square landmark distance (crop pixels) between the current face and the
    # nearest stored keyframe above which the store cannot help this pose; the WebRTC
    # path then asks the sender for a fresh I-frame (PLI).
    pli_distance_threshold: float = 8.0
    predictor_path: Path | None = None
    detector_path: Path | None = None
    # "subpixel" keeps the eye centres fractional so the crop follows the face smoothly;
    # "published" casts them to int as the authors' code does (for parity).
    alignment: AlignmentMode = "subpixel"
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
    paste_mode: PasteMode = "correction"
    # "continuous": a paste mask whose inset and softness follow the face size smoothly;
    # "published": the authors' integer erosion and blur, which jump as the face size changes.
    paste_mask: MaskShape = "continuous"
    # Where the decoder repeated a pixel of the previous frame exactly (a skipped block) and the
    # paste changes it, the output moves this fraction of the way from the previous output towards
    # the fresh restoration (see restore.repeats): a face the codec kept still stays still.
    # 1: every frame's restoration is used as it comes.
    repeat_update: float = 0.25
    # A frame the live engine cannot restore in time gets the last restored frame's correction,
    # moved with the face, if that frame is at most this many seconds of stream time older.
    carry_forward_seconds: float = 0.5

    def __post_init__(self) -> None:
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if value not in choices:
                raise ConfigError(f"{name}: {value!r} is not one of {', '.join(choices)}")


# field name -> its allowed values, read once from the Literal annotations
_CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(hint) for name, hint in get_type_hints(RestoreSettings).items() if get_origin(hint) is Literal
}
