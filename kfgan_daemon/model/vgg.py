"""VGG-19 feature extractor laid out like the published generator's `vgg_extractor`.

Layers are named `conv1_1` ... `conv5_4` (torchvision's VGG-19 `features`, renamed),
so a torchvision `vgg19` state dict maps onto it by position and the published
checkpoint maps onto it by name.
"""
from __future__ import annotations

from collections.abc import Sequence

from collections import OrderedDict

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Convolutions per VGG-19 stage; a 2x2 max-pool separates stages.
_STAGES = (2, 2, 4, 4, 4)
_CHANNELS = (64, 128, 256, 512, 512)
DEFAULT_LAYERS = ("relu2_2", "relu3_4", "relu4_4", "conv5_4")


def _layer_names() -> list[str]:
    names = []
    for stage, convs in enumerate(_STAGES, start=1):
        if stage > 1:
            names.append(f"pool{stage - 1}")
        for i in range(1, convs + 1):
            names += [f"conv{stage}_{i}", f"relu{stage}_{i}"]
    return names


class VGGFeatureExtractor(nn.Module):
    """VGG-19 truncated after the deepest requested layer; returns the requested activations in order.

    With `range_norm` the input is mapped x -> (x + 1) / 2 before the ImageNet normalisation. The
    published generator does this even though it is fed images in [0, 1], and its checkpoint was
    trained that way, so the full generator keeps it.
    """

    def __init__(self, layers: tuple[str, ...] = DEFAULT_LAYERS, range_norm: bool = True) -> None:
        super().__init__()
        names = _layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise ValueError(f"unknown VGG-19 layers {unknown}")
        self.layers = tuple(layers)
        self.range_norm = range_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        last = max(names.index(name) for name in layers)
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        stage = 0
        for name in names[: last + 1]:
            if name.startswith("pool"):
                modules[name] = nn.MaxPool2d(kernel_size=2, stride=2)
            elif name.startswith("conv"):
                stage = int(name[4]) - 1
                modules[name] = nn.Conv2d(in_ch, _CHANNELS[stage], kernel_size=3, padding=1)
                in_ch = _CHANNELS[stage]
            else:
                modules[name] = nn.ReLU(inplace=True)
        self.vgg_net = nn.Sequential(modules)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.range_norm:
            x = (x + 1) / 2
        x = (x - self.mean) / self.std
        wanted = set(self.layers)
        found: dict[str, torch.Tensor] = {}
        for name, module in self.vgg_net.named_children():
            x = module(x)
            if name in wanted:
                # The next in-place ReLU would overwrite a captured conv output.
                found[name] = x.clone() if name.startswith("conv") else x
        return [found[name] for name in self.layers]


def vgg_conv_layers(plan: "Sequence[int | str]") -> list[nn.Module]:
    """torchvision's VGG ``features`` layout for ``plan`` (channel widths, "M" for max-pooling),
    so that a torchvision state dict's ``features.N.*`` keys load by position."""
    layers: list[nn.Module] = []
    channels = 3
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return layers
