"""Building blocks shared by our CPU generators (lite and guided)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kfgan_daemon.model.checkpoint import load_weights

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

    def start_as_identity(self) -> None:
        """A block added to a trained body must not change what the body computes."""
        start_as_identity(self.conv2)


def start_as_identity(tail: nn.Conv2d) -> None:
    """Zero the layer that makes the residual: training begins from "output = compressed input",
    not from noise."""
    nn.init.zeros_(tail.weight)
    nn.init.zeros_(tail.bias)


def load_deepened(module: nn.Module, state_dict: Mapping[str, torch.Tensor], origin: str) -> list[str]:
    """Load a shallower generator's weights into ``module``, whose extra residual blocks start as identity.

    Only whole :class:`ResidualBlock` s may be missing from ``state_dict``; every other
    tensor must be there with its shape, so the deepened generator computes exactly what
    the loaded one did until training moves the new blocks. Returns the names of the
    blocks that started as identity (empty when ``state_dict`` fits as it is).
    """
    own = module.state_dict()
    missing = {k for k in own if k not in state_dict}
    added = [
        name
        for name, block in module.named_modules()
        if isinstance(block, ResidualBlock) and all(f"{name}.{k}" in missing for k in block.state_dict())
    ]
    load_weights(module, state_dict, origin, fresh=tuple(f"{name}." for name in added))
    for name in added:
        module.get_submodule(name).start_as_identity()
    return added


class RebuildableGenerator(nn.Module):
    """A generator that remembers its constructor keywords, which checkpoints store as metadata."""

    def __init__(self, **config: Any) -> None:
        super().__init__()
        self._config = config

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (JSON-serialisable) that rebuild this architecture."""
        return dict(self._config)
