"""The lite generator: a small keyframe-guided restorer that runs in real time on a CPU.

Same contract as the published generator: ``forward(compressed, reference, landmarks)``,
each N x 3 x 256 x 256 RGB float in [0, 1], returns the restored crop as a residual on
``compressed``. All the work happens at a quarter of the resolution: pixel-unshuffle
turns every 4x4 patch into channels, so a 3x3 convolution there sees a 12x12 window of
pixels at 1/16 of the full-resolution cost, and pixel-shuffle turns the result back.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kfgan_daemon.model.blocks import LEAKY_SLOPE, RebuildableGenerator, ResidualBlock, start_as_identity
from kfgan_daemon.model.blocks import conv as _conv

__all__ = ["LiteGenerator"]


class ReferenceFusion(nn.Module):
    """Blend reference features into the degraded ones where they agree, then modulate.

    A spatial gate (ASFF-style) decides per position and channel how much of the
    warped reference to take: the MLS warp is good on the face and wrong near its
    border and wherever the pose differs, so the gate must come from both feature
    maps. Spatial feature transform (scale and shift from the same joint features)
    lets the landmarks steer the result without adding a branch.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.joint = _conv(2 * channels, channels)
        self.heads = _conv(channels, 3 * channels, kernel_size=1)

    def forward(self, degraded: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        joint = F.leaky_relu(self.joint(torch.cat([degraded, reference], dim=1)), LEAKY_SLOPE)
        gate, scale, shift = self.heads(joint).chunk(3, dim=1)
        fused = degraded + torch.sigmoid(gate) * (reference - degraded)
        return fused * (1 + scale) + shift


class LiteGenerator(RebuildableGenerator):
    """Keyframe-guided restorer for 256x256 aligned face crops, CPU real-time sized.

    ``LiteGenerator(**model.config)`` rebuilds an identical architecture, which is what
    checkpoints store as metadata.
    """

    def __init__(self, channels: int = 32, blocks: int = 4, fusion_blocks: int = 1, unshuffle: int = 4) -> None:
        if channels < 1 or blocks < 0 or fusion_blocks < 1 or unshuffle < 1:
            raise ValueError(
                f"invalid LiteGenerator size: channels={channels}, blocks={blocks}, "
                f"fusion_blocks={fusion_blocks}, unshuffle={unshuffle}"
            )
        super().__init__(channels=channels, blocks=blocks, fusion_blocks=fusion_blocks, unshuffle=unshuffle)
        patch = unshuffle * unshuffle
        self.unshuffle = nn.PixelUnshuffle(unshuffle)
        # 1x1 heads: the unshuffled channels already hold a 4x4 window and the
        # body's 3x3 convolutions add the context; a 3x3 head would cost as much as a block.
        self.degraded_head = _conv(3 * patch, channels, kernel_size=1)
        # Reference and landmark image share one encoder: the landmark dots tell the
        # encoder where the warp is anchored, hence where the reference can be trusted.
        self.reference_head = _conv(6 * patch, channels, kernel_size=1)
        self.reference_body = _conv(channels, channels)
        self.fusions = nn.ModuleList(ReferenceFusion(channels) for _ in range(fusion_blocks))
        self.body = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.tail = _conv(channels, 3 * patch)
        self.shuffle = nn.PixelShuffle(unshuffle)
        start_as_identity(self.tail)

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        degraded = F.leaky_relu(self.degraded_head(self.unshuffle(compressed)), LEAKY_SLOPE)
        guide = F.leaky_relu(self.reference_head(self.unshuffle(torch.cat([reference, landmarks], dim=1))), LEAKY_SLOPE)
        guide = F.leaky_relu(self.reference_body(guide), LEAKY_SLOPE)
        features = degraded
        for fusion in self.fusions:
            features = fusion(features, guide)
        features = self.body(features) + degraded
        return compressed + self.shuffle(self.tail(features))
