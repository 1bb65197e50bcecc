"""Multi-scale spectral-norm discriminator of the published training recipe.

Four PatchGAN-style critics look at the image at full, half, quarter and eighth
resolution; the state dict matches the published `MultiScaleDiscriminator`
(`D_pool.<scale>.model.<i>` and `D_pool.<scale>.score_out`), so published
discriminator checkpoints load strictly as well.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm


class PatchDiscriminator(nn.Module):
    """One critic: a stride-1 stem, `num_layers` stride-2 stages, a 1-channel score map."""

    def __init__(self, input_ch: int = 3, base_ch: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, out_ch = input_ch, base_ch
        for i in range(num_layers + 1):
            stride = 1 if i == 0 else 2
            layers += [
                spectral_norm(nn.Conv2d(in_ch, out_ch, 3, stride, 1)),
                nn.BatchNorm2d(out_ch),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            in_ch, out_ch = out_ch, out_ch * 2
        self.model = nn.Sequential(*layers)
        self.score_out = nn.Conv2d(in_ch, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_out(self.model(x))


class MultiScaleDiscriminator(nn.Module):
    """Critics at scales 1, 1/2, 1/4, 1/8 of the input; returns their score maps, finest first."""

    def __init__(self, input_ch: int = 3, base_ch: int = 64, num_layers: int = 3, num_discriminators: int = 4) -> None:
        super().__init__()
        self.D_pool = nn.ModuleList(
            PatchDiscriminator(input_ch, base_ch, num_layers) for _ in range(num_discriminators)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scores = []
        for i, critic in enumerate(self.D_pool):
            # Box-filter downsampling: every coarser critic sees an alias-free copy.
            scaled = x if i == 0 else F.avg_pool2d(x, 2**i)
            scores.append(critic(scaled))
        return scores
