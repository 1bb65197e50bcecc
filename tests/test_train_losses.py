"""Each loss against a value worked out by hand on tiny tensors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kfgan_daemon.errors import ModelError
from kfgan_daemon.train import losses as L


def _pair() -> tuple[torch.Tensor, torch.Tensor]:
    # 1 x 1 x 2 x 2: prediction [[0, 1], [1, 0]], target [[0, 0.5], [1, 1]]
    prediction = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    target = torch.tensor([[[[0.0, 0.5], [1.0, 1.0]]]])
    return prediction, target


def test_mse() -> None:
    p, t = _pair()
    # differences 0, 0.5, 0, -1 -> (0 + 0.25 + 0 + 1) / 4
    assert L.mse_loss(p, t).item() == pytest.approx(0.3125)


def test_charbonnier() -> None:
    p, t = _pair()
    eps = 1e-3
    expected = (2 * eps + math.sqrt(0.25 + eps**2) + math.sqrt(1 + eps**2)) / 4
    assert L.charbonnier_loss(p, t, eps=eps).item() == pytest.approx(expected, rel=1e-6)


def test_gradient() -> None:
    p, t = _pair()
    # horizontal differences: p (1, -1), t (0.5, 0) -> |0.5| + |-1| = 1.5, mean 0.75
    # vertical differences:   p (1, -1), t (1, 0.5) -> |0| + |-1.5| = 1.5, mean 0.75
    assert L.gradient_loss(p, t).item() == pytest.approx(0.5 * (0.75 + 0.75))


def test_ssim_of_constant_images() -> None:
    # Constant images: variances and covariance vanish, SSIM = (2 a b + C1) / (a^2 + b^2 + C1).
    a, b = 0.2, 0.6
    # float64: in float32, E[x^2] - E[x]^2 leaves a variance of ~1e-8, visible next to C2.
    x = torch.full((1, 3, 11, 11), a, dtype=torch.float64)
    y = torch.full((1, 3, 11, 11), b, dtype=torch.float64)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert L.ssim(x, y).item() == pytest.approx(expected, rel=1e-5)
    assert L.ssim_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_ssim_of_uncorrelated_structure() -> None:
    # Same means, window 1 (sigma tiny): each pixel is its own window, variance 0,
    # so SSIM reduces to the luminance term per pixel.
    x = torch.tensor([[[[0.25, 0.75]]]])
    y = torch.tensor([[[[0.75, 0.25]]]])
    c1 = 0.01**2
    term = (2 * 0.25 * 0.75 + c1) / (0.25**2 + 0.75**2 + c1)
    assert L.ssim(x, y, window=1, sigma=1.0).item() == pytest.approx(term, rel=1e-5)


def test_psnr() -> None:
    p, t = _pair()
    assert L.psnr(p, t).item() == pytest.approx(10 * math.log10(1 / 0.3125), rel=1e-6)


def test_gram_matrix() -> None:
    # 1 x 2 x 1 x 2 features: channel rows (1, 2) and (3, 4); F F^T / (C H W) = [[5, 11], [11, 25]] / 4
    features = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    assert torch.allclose(L.gram_matrix(features), torch.tensor([[[5.0, 11.0], [11.0, 25.0]]]) / 4)


def test_hinge_losses_weight_each_scale() -> None:
    real = [torch.tensor([2.0, 0.0]), torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([1.0])]
    fake = [torch.tensor([-2.0, 0.0]), torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([-0.5])]
    # relu(1 - real) means: (0 + 1) / 2 = 0.5, 0.5, 2, 0
    # relu(1 + fake) means: (0 + 1) / 2 = 0.5, 1.5, 2, 0.5
    expected_d = 4 * (0.5 + 0.5) + 2 * (0.5 + 1.5) + 1 * (2 + 2) + 1 * (0 + 0.5)
    assert L.discriminator_hinge_loss(real, fake).item() == pytest.approx(expected_d)
    # -mean(fake): 1, -0.5, -1, 0.5
    expected_g = 4 * 1.0 + 2 * -0.5 + 1 * -1.0 + 1 * 0.5
    assert L.generator_hinge_loss(fake).item() == pytest.approx(expected_g)
    with pytest.raises(ModelError, match="scales"):
        L.generator_hinge_loss(fake[:3])


def _tiny_vgg_file(path: Path) -> Path:
    """torchvision layout (features.N.weight/bias) with every conv an exact identity on channel 0."""
    state = {}
    in_channels = 3
    index = 0
    for item in L._VGG19_PLAN:
        if item == "M":
            index += 1
            continue
        weight = torch.zeros(int(item), in_channels, 3, 3)
        weight[0, 0, 1, 1] = 1.0
        state[f"features.{index}.weight"] = weight
        state[f"features.{index}.bias"] = torch.zeros(int(item))
        in_channels = int(item)
        index += 2
    state["classifier.0.weight"] = torch.zeros(1)
    torch.save(state, path)
    return path


def test_perceptual_and_style_with_identity_vgg(tmp_path: Path) -> None:
    features = L.VGGFeatures(_tiny_vgg_file(tmp_path / "vgg19.pth"), layers=["relu2_2"])
    # relu2_2 sits after one 2x2 max-pool: channel 0 = maxpool(relu((x_R - 0.485) / 0.229)), other channels 0.
    x = torch.full((1, 3, 4, 4), 0.485 + 0.229 * 2.0)  # normalised red = 2
    y = torch.full((1, 3, 4, 4), 0.485 + 0.229 * 1.0)  # normalised red = 1
    out_x = features(x)["relu2_2"]
    assert out_x.shape == (1, 128, 2, 2) and out_x[0, 0].allclose(torch.full((2, 2), 2.0), atol=1e-5)
    perceptual, style = L.PerceptualLoss(features)(x, y)
    # |2 - 1| on 4 of 128 * 4 values
    assert perceptual.item() == pytest.approx(1.0 / 128, rel=1e-4)
    # Gram [0, 0]: sum of squares / (C H W): 4 * 4 / 512 vs 4 * 1 / 512, one entry of 128 * 128
    assert style.item() == pytest.approx((16 - 4) / 512 / (128 * 128), rel=1e-4)


def test_vgg_needs_weights_and_says_where_from(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="vgg19-dcbb9e9d.pth"):
        L.VGGFeatures(None)
    with pytest.raises(ModelError, match="not found"):
        L.VGGFeatures(tmp_path / "missing.pth")
    with pytest.raises(ModelError, match="unknown VGG-19 loss layers"):
        L.VGGFeatures(None, layers=["relu9_9"])
