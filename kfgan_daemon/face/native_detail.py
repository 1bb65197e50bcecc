"""The band of a close-up's own pixels that the generator's crop cannot hold, and the filter for it.

When a face is larger than the generator's crop, the crop holds only the frame's
lower frequencies. What it misses, the *native band* ``native - up(down(native))``,
passes a correction paste untouched. At a call's bit rates that band is part
detail, part the codec's ringing and blocking, and the mix depends on the bit rate:
keeping all of it (the plain correction paste) loses to dropping all of it (the
published full replace) at CRF 42, and wins clearly at CRF 32.

So a model may carry a small adaptive loop filter for the band, in the manner of
VVC's ALF: one least-squares kernel, and a gain for each class of local band
activity, fitted on the training persons' close-ups (``kfgan-daemon fit-detail``)
and stored in the model file. (Fitted as one kernel per class, the kernels came out
as nearly the same shape at different gains; one shared kernel keeps the held-out
gain and costs one filtering pass instead of six.) The paste adds
``filter(band) - band`` to a face larger than the crop. A generator without a filter
(an identity generator, the published checkpoint) leaves the band exactly as it
arrived.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np

from kfgan_daemon.errors import ModelError

# Side of each kernel: 7 covers a 4x4 transform block and its neighbours' edges.
KERNEL_SIZE = 7
# Local activity: the mean absolute band over this square window, in luma levels, counted in
# steps of 1/32 level in a uint8 (so up to 7.97 levels; every edge sits on a step).
ACTIVITY_WINDOW = 5
ACTIVITY_STEPS = 32
ACTIVITY_EDGES = (0.5, 1.0, 1.5, 2.5, 4.0)
# Crop pixels per frame pixel at and below which the band is filtered at full strength;
# from there to 1 the strength ramps down, so that a face growing past the crop size
# does not switch the filter on in one frame.
FULL_STRENGTH_SCALE = 0.9
# Tensor names in a model file (.safetensors), and the metadata key that says how it was fitted.
TENSOR_PREFIX = "native_detail."
METADATA_KEY = "native_detail"


@dataclass(frozen=True)
class NativeDetailFilter:
    """A square ``kernel`` of odd side and one gain per activity class (``len(activity_edges) + 1``).

    ``strength`` (0 to 1) is how far the filtered band goes from the band as it arrived.
    The least-squares fit (strength 1) is best for PSNR but attenuates true detail along
    with the codec's noise, which VMAF counts as detail loss: a lower strength trades
    PSNR for VMAF (``kfgan-daemon fit-detail --strength``).
    """

    kernel: np.ndarray
    gains: np.ndarray
    activity_edges: np.ndarray
    strength: float = 1.0
    # Gain by quantised activity (256 entries), for cv2.LUT.
    _gain_table: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kernel = np.asarray(self.kernel, dtype=np.float32)
        gains = np.asarray(self.gains, dtype=np.float32)
        edges = np.asarray(self.activity_edges, dtype=np.float32)
        if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
            raise ModelError(f"the native detail kernel must be square with an odd side, got {kernel.shape}")
        if gains.ndim != 1 or edges.shape != (gains.shape[0] - 1,) or np.any(np.diff(edges) <= 0):
            raise ModelError(
                f"native detail: {gains.shape} gains need one more than the increasing activity edges, "
                f"got {edges.tolist()}"
            )
        if not 0.0 <= float(self.strength) <= 1.0:
            raise ModelError(f"native detail strength must lie in [0, 1], got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))
        object.__setattr__(self, "kernel", kernel)
        object.__setattr__(self, "gains", gains)
        object.__setattr__(self, "activity_edges", edges)
        object.__setattr__(self, "_gain_table", gains[_class_table(edges)].reshape(256, 1))

    def __call__(self, band: np.ndarray) -> np.ndarray:
        """The filtered band (float32): the kernel's response times its sample's class gain, taken
        ``strength`` of the way from the band."""
        band = np.asarray(band, dtype=np.float32)
        # filter2D correlates, which is how the kernel was fitted (patch . kernel).
        filtered = cv2.filter2D(band, -1, self.kernel, borderType=cv2.BORDER_REPLICATE)
        filtered = cv2.multiply(filtered, cv2.LUT(_activity_steps(band), self._gain_table))
        if self.strength == 1.0:
            return filtered
        return cv2.addWeighted(filtered, self.strength, band, 1.0 - self.strength, 0.0)

    def with_strength(self, strength: float) -> "NativeDetailFilter":
        return NativeDetailFilter(self.kernel, self.gains, self.activity_edges, strength)

    def to_tensors(self) -> dict[str, np.ndarray]:
        return {
            TENSOR_PREFIX + "kernel": self.kernel,
            TENSOR_PREFIX + "gains": self.gains,
            TENSOR_PREFIX + "activity_edges": self.activity_edges,
            TENSOR_PREFIX + "strength": np.array([self.strength], dtype=np.float32),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, np.ndarray], origin: str = "model file") -> "NativeDetailFilter | None":
        """The filter stored under :data:`TENSOR_PREFIX` (None when the file has none). Filters
        stored before the strength existed have none and apply at full strength."""
        names = {TENSOR_PREFIX + name for name in ("kernel", "gains", "activity_edges")}
        strength = TENSOR_PREFIX + "strength"
        present = {name for name in tensors if name.startswith(TENSOR_PREFIX)}
        if not present:
            return None
        if present - {strength} != names:
            raise ModelError(
                f"{origin}: its native detail filter has {sorted(present)}, not {sorted(names | {strength})}; refit it "
                "with `kfgan-daemon fit-detail`"
            )
        parts = (np.asarray(tensors[TENSOR_PREFIX + name]) for name in ("kernel", "gains", "activity_edges"))
        return cls(*parts, float(np.asarray(tensors[strength]).reshape(-1)[0]) if strength in present else 1.0)


def activity_classes(band: np.ndarray, edges: np.ndarray | tuple[float, ...] = ACTIVITY_EDGES) -> np.ndarray:
    """The activity class (0 = calmest) of every sample of ``band``: how many of ``edges`` its
    mean absolute value over an ``ACTIVITY_WINDOW`` square (in steps of 1 / ACTIVITY_STEPS) exceeds."""
    table = _class_table(np.asarray(edges, dtype=np.float32)).astype(np.uint8)
    return cv2.LUT(_activity_steps(np.asarray(band, dtype=np.float32)), table)


def _activity_steps(band: np.ndarray) -> np.ndarray:
    activity = cv2.blur(np.abs(band), (ACTIVITY_WINDOW, ACTIVITY_WINDOW), borderType=cv2.BORDER_REPLICATE)
    return cv2.convertScaleAbs(activity, alpha=ACTIVITY_STEPS)


def _class_table(edges: np.ndarray) -> np.ndarray:
    """Class of each of the 256 activity steps."""
    steps = np.arange(256, dtype=np.float32) / ACTIVITY_STEPS
    return (steps[:, None] > edges[None, :]).sum(axis=1)


def native_band(native: np.ndarray, to_crop: np.ndarray, to_region: np.ndarray, crop_size: tuple[int, int]) -> np.ndarray:
    """``native - up(down(native))`` over a frame region's luma, float32.

    ``to_crop`` maps region pixels to crop pixels and ``to_region`` back; down is the
    alignment's bicubic resampling into the ``crop_size`` (h, w) crop, up the paste's
    bilinear one. The band depends on the frame alone, so a carried-forward correction
    gets the band of the frame it lands on.
    """
    crop_h, crop_w = crop_size
    native = native.astype(np.float32)
    down = cv2.warpAffine(native, to_crop, (crop_w, crop_h), flags=cv2.INTER_CUBIC)
    up = cv2.warpAffine(down, to_region, (native.shape[1], native.shape[0]), flags=cv2.INTER_LINEAR)
    return cv2.subtract(native, up)


def band_strength(crop_scale: float) -> float:
    """How much of the filter applies at ``crop_scale`` crop pixels per frame pixel: 0 for a
    face no larger than the crop (the band is then only resampling error), 1 from
    :data:`FULL_STRENGTH_SCALE` down."""
    return float(np.clip((1.0 - crop_scale) / (1.0 - FULL_STRENGTH_SCALE), 0.0, 1.0))

