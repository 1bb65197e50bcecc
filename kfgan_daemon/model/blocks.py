"""Building blocks shared by our CPU generators (lite and guided)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.2


def conv(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Conv2d:
    """A convolution padded to keep the size (divided by ``stride``)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels)
        self.conv2 = conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.leaky_relu(self.conv1(x), LEAKY_SLOPE))


def start_as_identity(tail: nn.Conv2d) -> None:
    """Zero the layer that makes the residual: training begins from "output = compressed input",
    not from noise."""
    nn.init.zeros_(tail.weight)
    nn.init.zeros_(tail.bias)


class RebuildableGenerator(nn.Module):
    """A generator that remembers its constructor keywords, which checkpoints store as metadata."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._config = config

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this architecture."""
        return dict(self._config)
