"""LPIPS (Zhang et al., CVPR 2018) from weight files the user provides; nothing is downloaded.

LPIPS needs two files: the ImageNet backbone in torchvision's layout
(``alexnet-owt-7be5be79.pth`` or ``vgg16-397923af.pth``, keys ``features.N.weight``)
and the calibrated linear heads of the LPIPS release (``alex.pth`` / ``vgg.pth`` of
its weights/v0.1 folder, keys ``linK.model.1.weight``). The distance is the sum
over the backbone's five tapped layers of the spatially averaged, head-weighted
squared difference of channel-normalised features, on RGB input scaled to [-1, 1]
and shifted/scaled per channel as the release does.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from kfgan_daemon.model.vgg import vgg_conv_layers

from kfgan_daemon.errors import MetricUnavailableError

LpipsNet = Literal["alex", "vgg"]

# (kind, in, out, kernel, stride, padding) per torchvision `features` index; "M" is a max pool.
_ALEX = [
    ("C", 3, 64, 11, 4, 2), ("R",), ("M", 3, 2),
    ("C", 64, 192, 5, 1, 2), ("R",), ("M", 3, 2),
    ("C", 192, 384, 3, 1, 1), ("R",),
    ("C", 384, 256, 3, 1, 1), ("R",),
    ("C", 256, 256, 3, 1, 1), ("R",),
]  # fmt: skip
_ALEX_TAPS = (2, 5, 8, 10, 12)  # slice ends: relu1 .. relu5
_VGG_WIDTHS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
_VGG_TAPS = (4, 9, 16, 23, 30)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def _alex_layers() -> list[nn.Module]:
    layers: list[nn.Module] = []
    for spec in _ALEX:
        if spec[0] == "C":
            _, cin, cout, k, s, p = spec
            layers.append(nn.Conv2d(cin, cout, k, stride=s, padding=p))
        elif spec[0] == "R":
            layers.append(nn.ReLU(inplace=False))
        else:
            layers.append(nn.MaxPool2d(spec[1], spec[2]))
    return layers


def _vgg_layers() -> list[nn.Module]:
    return vgg_conv_layers(_VGG_WIDTHS)


@dataclass(frozen=True, slots=True)
class LpipsWeights:
    """Where the user keeps the two LPIPS weight files."""

    backbone: Path
    heads: Path
    net: LpipsNet = "alex"


class Lpips(nn.Module):
    """LPIPS distance between batches of images; lower is more similar (0 for identical)."""

    def __init__(self, net: LpipsNet = "alex") -> None:
        super().__init__()
        if net not in ("alex", "vgg"):
            raise ValueError(f"unknown LPIPS backbone {net!r}; use alex or vgg")
        self.net = net
        self.features = nn.Sequential(*(_alex_layers() if net == "alex" else _vgg_layers()))
        self.taps = _ALEX_TAPS if net == "alex" else _VGG_TAPS
        widths = [self._width_before(end) for end in self.taps]
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1, bias=False) for width in widths)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _width_before(self, end: int) -> int:
        return next(layer.out_channels for layer in reversed(self.features[:end]) if isinstance(layer, nn.Conv2d))

    @classmethod
    def from_files(cls, weights: LpipsWeights) -> "Lpips":
        for path, what in ((weights.backbone, "backbone"), (weights.heads, "linear heads")):
            if not Path(path).is_file():
                raise MetricUnavailableError(f"LPIPS {what} weights {path} do not exist (no download: give the file's path)")
        model = cls(weights.net)
        backbone = torch.load(weights.backbone, map_location="cpu", weights_only=True)
        heads = torch.load(weights.heads, map_location="cpu", weights_only=True)
        model.load_weights(backbone, heads)
        return model

    def load_weights(self, backbone: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> None:
        """torchvision backbone state dict (classifier keys ignored) and LPIPS head state dict."""
        features = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
        head_state = {}
        for index in range(len(self.heads)):
            key = f"lin{index}.model.1.weight"
            if key not in heads:
                raise MetricUnavailableError(f"LPIPS heads file lacks {key}; expected the release's {self.net}.pth")
            head_state[f"{index}.weight"] = heads[key]
        try:
            self.features.load_state_dict(features, strict=True)
            self.heads.load_state_dict(head_state, strict=True)
        except RuntimeError as exc:
            raise MetricUnavailableError(f"LPIPS weights do not fit the {self.net} layout: {exc}") from exc

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b: N x 3 x H x W RGB in [-1, 1] -> N distances."""
        x, y = (a - self.shift) / self.scale, (b - self.shift) / self.scale
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        start = 0
        for end, head in zip(self.taps, self.heads):
            for layer in self.features[start:end]:
                x, y = layer(x), layer(y)
            start = end
            diff = (_unit(x) - _unit(y)) ** 2
            total = total + head(diff).mean(dim=(1, 2, 3))
        return total

    @torch.no_grad()
    def distance(self, a_rgb: Sequence[np.ndarray] | np.ndarray, b_rgb: Sequence[np.ndarray] | np.ndarray) -> list[float]:
        """LPIPS between uint8 RGB images (one or a batch of equal size)."""
        return self(_to_input(a_rgb, self.shift.device), _to_input(b_rgb, self.shift.device)).tolist()


def _unit(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _to_input(images: Sequence[np.ndarray] | np.ndarray, device: torch.device) -> torch.Tensor:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    return torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
