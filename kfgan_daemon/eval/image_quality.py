"""Full-reference image quality metrics on uint8 pictures.

Conventions (the report repeats them, so numbers are never read without them):

- PSNR: over all three colour channels, data range 255, 10 * log10(255^2 / MSE)
  (scikit-image's ``peak_signal_noise_ratio``). Identical pictures have an
  infinite PSNR; it is capped at ``PSNR_CAP_DB`` so that averages and JSON stay finite.
- SSIM: Wang et al. (2004) as scikit-image implements it, Gaussian window with
  sigma 1.5 (truncated at 3.5 sigma, i.e. 11x11), population covariances
  (``use_sample_covariance=False``), K1 = 0.01, K2 = 0.03, data range 255.
  By default on the luma channel Y = 0.299 R + 0.587 G + 0.114 B (BT.601, kept
  in floating point, not rounded to uint8); ``channel="rgb"`` averages SSIM
  over the three colour channels instead.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DATA_RANGE = 255.0
PSNR_CAP_DB = 100.0
SSIM_SIGMA = 1.5

SsimChannel = Literal["y", "rgb"]

# BT.601 luma weights in RGB order (the crops' order).
_LUMA_RGB = np.array([0.299, 0.587, 0.114])


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"metrics expect uint8 images, got {a.dtype} and {b.dtype}")


def luma(image_rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an H x W x 3 RGB uint8 image as float64 in [0, 255]."""
    return image_rgb.astype(np.float64) @ _LUMA_RGB


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB between two uint8 images of the same shape, capped at ``PSNR_CAP_DB``."""
    _check_pair(a, b)
    if np.array_equal(a, b):
        return PSNR_CAP_DB
    value = peak_signal_noise_ratio(a, b, data_range=DATA_RANGE)
    return float(min(value, PSNR_CAP_DB))


def ssim(a: np.ndarray, b: np.ndarray, channel: SsimChannel = "y") -> float:
    """SSIM between two uint8 images (H x W x 3 RGB, or H x W gray) with the module's conventions."""
    _check_pair(a, b)
    options = dict(data_range=DATA_RANGE, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False)
    if a.ndim == 2:
        return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), **options))
    if channel == "y":
        return float(structural_similarity(luma(a), luma(b), **options))
    if channel == "rgb":
        return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), channel_axis=2, **options))
    raise ValueError(f"unknown SSIM channel {channel!r}; use 'y' or 'rgb'")


def luma_bias(image: np.ndarray, truth: np.ndarray) -> float:
    """Mean BT.601 luma of ``image`` minus that of ``truth``, in gray levels.

    Not a quality score but a diagnostic: a colour-conversion mismatch between
    the training data and the codec path shows up here as a constant offset.
    """
    _check_pair(image, truth)
    return float(luma(image).mean() - luma(truth).mean())


def conventions(channel: SsimChannel = "y") -> dict[str, str]:
    """A plain description of how the numbers were computed, for reports."""
    ssim_on = "BT.601 luma Y (float, not rounded)" if channel == "y" else "each of R, G, B, averaged"
    return {
        "psnr": f"all three colour channels, data range 255, identical images capped at {PSNR_CAP_DB:g} dB",
        "ssim": (
            f"{ssim_on}; Gaussian window sigma {SSIM_SIGMA} (11x11), population covariance, "
            "K1=0.01, K2=0.03, data range 255 (scikit-image structural_similarity)"
        ),
        "crop": (
            "crop metrics (crop PSNR, SSIM, LPIPS, ΔY): aligned 256x256 face crops; ground truth is the original "
            "frame aligned with the compressed frame's matrix (eval --end-to-end's face PSNR is another measure: "
            "the landmark box of the decoded luma plane)"
        ),
        "frame": (
            "whole frames, PSNR and SSIM on the decoded luma (Y) planes; model rows paste the restored crop "
            "back into the compressed frame's YUV planes"
        ),
        "crop_luma_bias": "mean BT.601 luma of the row's face crop minus the ground truth's, gray levels (a diagnostic)",
        "face_flicker": (
            "mean absolute frame-to-frame change of the row's luma error (decoded Y minus the original's) over the "
            "aligned crop's footprint in the later frame, in Y levels, over consecutive frames that both have a face; "
            "at or below the input's means the restoration adds no shimmer"
        ),
        "averaging": "per clip: mean over frames (crop and face metrics over frames with a face); average: mean over clips",
    }
