"""The guided generator: the lite model's interface with local attention on the keyframe.

Same contract as the other generators: ``forward(compressed, reference, landmarks)``,
each N x 3 x 256 x 256 RGB float in [0, 1], returns the restored crop as a residual on
``compressed``. It differs from :class:`~kfgan_daemon.model.lite.LiteGenerator` where
the lite model was weakest on unseen faces, the use of the reference:

- The MLS warp is exact at the 68 landmarks and off by a few pixels between them.
  At 1/8 resolution every degraded feature attends over a 5 x 5 window of reference
  features (+-16 pixels of the crop), so the reference detail is fetched from where it
  actually is instead of from where the warp put it.
- The attention's best match says how well the reference fits at each place; a
  confidence map built from it (and from both feature maps) gates how much of the
  fetched reference replaces the degraded features, so that a wrong warp, a blink
  or another pose falls back on the degraded crop instead of pasting a ghost.
- Most of the capacity sits at 1/8 resolution (32 x 32 for a 256 crop), where a
  64-channel 3 x 3 convolution costs a quarter of what it costs at 1/4; the 1/4
  resolution path keeps the fine detail and a second, full-detail reference gate.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from kfgan_daemon.model.blocks import LEAKY_SLOPE, RebuildableGenerator, ResidualBlock, start_as_identity
from kfgan_daemon.model.blocks import conv as _conv

__all__ = ["GuidedGenerator"]


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE)


class LocalAttention(nn.Module):
    """Each degraded feature attends over a ``window`` x ``window`` neighbourhood of the reference.

    Returns the attended reference features and the attention's evidence (the
    softmax weights and the best normalised match per position), which is what the
    confidence gate needs to tell a fitting reference from a wrong one.
    """

    def __init__(self, channels: int, key_channels: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.query = _conv(channels, key_channels, kernel_size=1)
        self.key = _conv(channels, key_channels, kernel_size=1)
        # Cosine similarities lie in [-1, 1]; a learned temperature sharpens the softmax.
        self.log_temperature = nn.Parameter(torch.tensor(2.3))

    def forward(self, degraded: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = reference.shape[-2:]
        r = self.window // 2
        query = F.normalize(self.query(degraded), dim=1)
        keys = F.pad(F.normalize(self.key(reference), dim=1), (r, r, r, r))
        values = F.pad(reference, (r, r, r, r))
        # One shifted view per offset instead of an unfolded copy: the unfold's k*k-fold
        # tensors cost more memory traffic than the whole convolutional body.
        shifts = [(dy, dx) for dy in range(self.window) for dx in range(self.window)]
        similarity = torch.cat(
            [(query * keys[:, :, dy : dy + h, dx : dx + w]).sum(dim=1, keepdim=True) for dy, dx in shifts], dim=1
        )
        weights = torch.softmax(similarity * self.log_temperature.exp(), dim=1)
        attended = sum(weights[:, i : i + 1] * values[:, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shifts))
        best = similarity.amax(dim=1, keepdim=True)
        return attended, torch.cat([weights, best], dim=1)


class GuidedGenerator(RebuildableGenerator):
    """Keyframe-guided restorer for 256x256 aligned face crops with local reference attention.

    ``GuidedGenerator(**model.config)`` rebuilds an identical architecture, which is what
    checkpoints store as metadata. ``fine`` channels work at 1/4 resolution, ``coarse``
    channels at 1/8; ``blocks`` residual blocks at 1/8, ``fine_blocks`` at 1/4.
    """

    def __init__(
        self,
        fine: int = 32,
        coarse: int = 64,
        blocks: int = 4,
        fine_blocks: int = 1,
        window: int = 5,
        key_channels: int = 32,
    ) -> None:
        if min(fine, coarse, key_channels) < 1 or blocks < 0 or fine_blocks < 0 or window < 1 or window % 2 == 0:
            raise ValueError(
                f"invalid GuidedGenerator size: fine={fine}, coarse={coarse}, blocks={blocks}, "
                f"fine_blocks={fine_blocks}, window={window} (odd), key_channels={key_channels}"
            )
        super().__init__(
            fine=fine, coarse=coarse, blocks=blocks, fine_blocks=fine_blocks, window=window, key_channels=key_channels
        )
        self.unshuffle = nn.PixelUnshuffle(4)
        # 1x1 heads on 4x4 pixel patches, then one 3x3 layer for context.
        self.degraded_head = _conv(48, fine, kernel_size=1)
        self.degraded_body = _conv(fine, fine)
        # The landmark image rides with the reference: its dots say where the warp is anchored.
        self.reference_head = _conv(96, fine, kernel_size=1)
        self.reference_body = _conv(fine, fine)
        self.degraded_down = _conv(fine, coarse, stride=2)
        self.reference_down = _conv(fine, coarse, stride=2)
        self.attention = LocalAttention(coarse, key_channels, window)
        evidence = window * window + 1
        self.joint = _conv(2 * coarse + evidence, coarse, kernel_size=1)
        self.confidence = _conv(coarse, coarse)
        self.body = nn.Sequential(*(ResidualBlock(coarse) for _ in range(blocks)))
        self.up = _conv(coarse, 4 * fine, kernel_size=1)
        self.shuffle2 = nn.PixelShuffle(2)
        # The fine gate sees the upsampled coarse result (which already knows where the
        # reference fits) next to the full-detail reference features.
        self.fine_gate = _conv(2 * fine, fine)
        self.fine_body = nn.Sequential(*(ResidualBlock(fine) for _ in range(fine_blocks)))
        self.tail = _conv(fine, 48)
        self.shuffle4 = nn.PixelShuffle(4)
        start_as_identity(self.tail)

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        degraded = _act(self.degraded_head(self.unshuffle(compressed)))
        degraded = _act(self.degraded_body(degraded))
        guide = _act(self.reference_head(self.unshuffle(torch.cat([reference, landmarks], dim=1))))
        guide = _act(self.reference_body(guide))
        coarse = _act(self.degraded_down(degraded))
        coarse_guide = _act(self.reference_down(guide))
        attended, evidence = self.attention(coarse, coarse_guide)
        joint = _act(self.joint(torch.cat([coarse, attended, evidence], dim=1)))
        gate = torch.sigmoid(self.confidence(joint))
        features = coarse + gate * (attended - coarse) + joint
        features = self.body(features)
        fine = _act(self.shuffle2(self.up(features))) + degraded
        fine_gate = torch.sigmoid(self.fine_gate(torch.cat([fine, guide], dim=1)))
        fine = fine + fine_gate * (guide - fine)
        fine = self.fine_body(fine)
        return compressed + self.shuffle4(self.tail(fine))
