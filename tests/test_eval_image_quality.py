"""PSNR and SSIM against values computed by hand on tiny arrays."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kfgan_daemon.eval import image_quality


def test_psnr_of_a_known_mse():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 10, np.uint8)  # MSE = 100
    assert image_quality.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-9)


def test_psnr_averages_the_error_over_all_channels():
    a = np.full((2, 2, 3), 50, np.uint8)
    b = a.copy()
    b[..., 2] = 70  # one channel off by 20 everywhere: MSE = 400 / 3
    assert image_quality.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / (400 / 3)), abs=1e-9)


def test_psnr_of_identical_images_is_capped():
    a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert image_quality.psnr(a, a.copy()) == image_quality.PSNR_CAP_DB


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert image_quality.ssim(a, a.copy()) == pytest.approx(1.0)
    assert image_quality.ssim(a, a.copy(), channel="rgb") == pytest.approx(1.0)


def test_ssim_of_constant_images_matches_the_luminance_term():
    # Zero variance: the contrast-structure term is C2 / C2 = 1, leaving (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 110 + c1) / (100**2 + 110**2 + c1)
    assert image_quality.ssim(a, b) == pytest.approx(expected, abs=1e-9)
    assert image_quality.ssim(a, b, channel="rgb") == pytest.approx(expected, abs=1e-9)


def test_ssim_drops_with_noise_and_more_with_more_noise():
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:48, 0:48]
    clean = np.stack([(x * 5) % 256, (y * 5) % 256, (x + y) * 2 % 256], axis=-1).astype(np.uint8)
    light = np.clip(clean + rng.normal(0, 5, clean.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(clean + rng.normal(0, 30, clean.shape), 0, 255).astype(np.uint8)
    light_score, heavy_score = image_quality.ssim(clean, light), image_quality.ssim(clean, heavy)
    assert heavy_score < light_score < 1.0
    assert image_quality.ssim(light, clean) == pytest.approx(light_score)


def test_ssim_y_ignores_what_luma_does_not_see():
    # Swapping blue and red by amounts that cancel in BT.601 luma is invisible on Y but not on RGB.
    a = np.full((16, 16, 3), 128, np.uint8)
    b = a.copy()
    b[4:12, 4:12] = (128 - round(30 * 0.114 / 0.299), 128, 128 + 30)
    assert image_quality.ssim(a, b) > 0.99
    assert image_quality.ssim(a, b, channel="rgb") < 0.99


def test_luma_uses_bt601_weights_in_rgb_order():
    pixel = np.array([[[10, 20, 30]]], np.uint8)  # R, G, B
    assert image_quality.luma(pixel)[0, 0] == pytest.approx(0.299 * 10 + 0.587 * 20 + 0.114 * 30)


def test_metrics_refuse_mismatched_inputs():
    a = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        image_quality.psnr(a, np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        image_quality.ssim(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="channel"):
        image_quality.ssim(a, a, channel="lab")  # type: ignore[arg-type]


def test_luma_bias_is_the_mean_luma_offset():
    truth = np.full((4, 4, 3), 100, np.uint8)
    brighter = truth.copy()
    brighter[:2] = 104  # half the pixels +4 on every channel: luma +2 on average
    assert image_quality.luma_bias(brighter, truth) == pytest.approx(2.0)
    assert image_quality.luma_bias(truth, brighter) == pytest.approx(-2.0)
