"""Training losses: the paper's (MSE, VGG-19 perceptual and style, multi-scale hinge GAN)
and the pretrained-free ones the lite model trains with (Charbonnier, SSIM, gradient).

Images are N x 3 x H x W RGB floats in [0, 1] throughout.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kfgan_daemon.model.vgg import vgg_conv_layers
from torch.nn import functional as F

from kfgan_daemon.errors import ModelError

# torchvision's vgg19().features indices of relu2_2, relu3_4, relu4_4 and conv5_4.
VGG_LAYERS: dict[str, int] = {"relu2_2": 8, "relu3_4": 17, "relu4_4": 26, "conv5_4": 34}
# Convolution widths of vgg19's feature stack; "M" is a 2x2 max-pool.
_VGG19_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DISCRIMINATOR_SCALE_WEIGHTS = (4.0, 2.0, 1.0, 1.0)


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction, target)


def charbonnier_loss(prediction: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """mean(sqrt((p - t)^2 + eps^2)): L1 away from zero, smooth at zero."""
    return torch.sqrt((prediction - target) ** 2 + eps * eps).mean()


def gradient_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: block edges and blur both show up here."""
    dx = (prediction[..., :, 1:] - prediction[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (prediction[..., 1:, :] - prediction[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def _gaussian_window(size: int, sigma: float, channels: int, like: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(prediction: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004: Gaussian window, K1 = 0.01, K2 = 0.03, data range 1), valid region only."""
    channels = prediction.shape[1]
    kernel = _gaussian_window(window, sigma, channels, prediction)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_p, mu_t = blur(prediction), blur(target)
    var_p = blur(prediction * prediction) - mu_p**2
    var_t = blur(target * target) - mu_t**2
    cov = blur(prediction * target) - mu_p * mu_t
    score = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return score.mean()


def ssim_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 1.0 - ssim(prediction, target)


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1), shape N."""
    mse = ((prediction - target) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """N x C x C Gram matrices normalised by C * H * W."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


class VGGFeatures(nn.Module):
    """Frozen VGG-19 features at the loss layers, from torchvision's ``vgg19-dcbb9e9d.pth`` weights.

    Inputs in [0, 1] are normalised with the ImageNet statistics the weights expect.
    """

    def __init__(self, weights: Path | str | None, layers: Sequence[str] = tuple(VGG_LAYERS)) -> None:
        super().__init__()
        unknown = [name for name in layers if name not in VGG_LAYERS]
        if unknown:
            raise ModelError(f"unknown VGG-19 loss layers {unknown}; choose from {list(VGG_LAYERS)}")
        self.layers = {VGG_LAYERS[name]: name for name in layers}
        modules = vgg_conv_layers(_VGG19_PLAN)
        last = max(self.layers)
        self.features = nn.Sequential(*modules[: last + 1])
        self.features.load_state_dict(_vgg_state_dict(weights, last))
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        out: dict[str, torch.Tensor] = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.layers:
                out[self.layers[index]] = x
        return out


def _vgg_state_dict(weights: Path | str | None, last: int) -> dict[str, torch.Tensor]:
    if weights is None:
        raise ModelError(
            "this configuration uses the VGG-19 perceptual/style losses and needs ImageNet VGG-19 weights: "
            "set loss.vgg_weights to torchvision's vgg19-dcbb9e9d.pth (nothing is downloaded), "
            "or set the perceptual and style weights to 0"
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"VGG-19 weights {path} not found (expected torchvision's vgg19-dcbb9e9d.pth)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise ModelError(f"{path}: cannot read VGG-19 weights ({exc})") from exc
    state = {k[len("features.") :]: v for k, v in raw.items() if k.startswith("features.")}
    needed = [f"{i}.{p}" for i in range(last + 1) for p in ("weight", "bias")]
    wanted = {k: state[k] for k in needed if k in state}
    if not wanted:
        raise ModelError(f"{path}: no 'features.N.weight' keys; expected torchvision's vgg19 layout")
    return wanted


class PerceptualLoss(nn.Module):
    """Sum over layers of the mean L1 distance of VGG-19 features (``perceptual``) and of their
    Gram matrices (``style``)."""

    def __init__(self, features: VGGFeatures) -> None:
        super().__init__()
        self.features = features

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        predicted = self.features(prediction)
        with torch.no_grad():
            wanted = self.features(target)
        perceptual = prediction.new_zeros(())
        style = prediction.new_zeros(())
        for name, feature in predicted.items():
            reference = wanted[name]
            perceptual = perceptual + F.l1_loss(feature, reference)
            style = style + F.l1_loss(gram_matrix(feature.float()), gram_matrix(reference.float()))
        return perceptual, style


def _weighted_scales(outputs: Sequence[torch.Tensor], weights: Sequence[float], term) -> torch.Tensor:
    if len(outputs) != len(weights):
        raise ModelError(f"the discriminator gave {len(outputs)} scales but {len(weights)} scale weights are set")
    total = outputs[0].new_zeros(())
    for output, weight in zip(outputs, weights):
        total = total + weight * term(output)
    return total


def generator_hinge_loss(fake_outputs: Sequence[torch.Tensor], weights: Sequence[float] = DISCRIMINATOR_SCALE_WEIGHTS) -> torch.Tensor:
    """-sum_s w_s * mean(D_s(fake))."""
    return _weighted_scales(fake_outputs, weights, lambda out: -out.float().mean())


def discriminator_hinge_loss(
    real_outputs: Sequence[torch.Tensor],
    fake_outputs: Sequence[torch.Tensor],
    weights: Sequence[float] = DISCRIMINATOR_SCALE_WEIGHTS,
) -> torch.Tensor:
    """sum_s w_s * (mean(relu(1 - D_s(real))) + mean(relu(1 + D_s(fake))))."""
    real = _weighted_scales(real_outputs, weights, lambda out: F.relu(1.0 - out.float()).mean())
    fake = _weighted_scales(fake_outputs, weights, lambda out: F.relu(1.0 + out.float()).mean())
    return real + fake
