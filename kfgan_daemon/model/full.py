"""The published Keyframes-GAN generator ("full"), reimplemented.

Its state dict matches the authors' `DMSASFFNet` key for key, shape for shape and
in order, so their checkpoint `net_g_55000.pth` loads strictly; the forward pass
reproduces theirs (checked against `shared/reference/official_pipeline_fixture.npz`).

Data flow, for a degraded crop C, a warped reference R and a landmark image L:

- VGG-19 features of each at relu2_2, relu3_4, relu4_4 and conv5_4 (four scales);
- the reference features are AdaIN-matched to the degraded ones;
- at each scale a MASFF block fuses degraded and reference features under a mask
  predicted from all three inputs;
- a multi-scale dilation block refines the degraded conv5_4 features;
- four SFT up-blocks decode them, each modulated by the fused features of its scale;
- a head turns the result into an RGB residual that is added to C.

Convolutions outside VGG pad circularly, except the dilated ones and the blur, as published.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import spectral_norm

from kfgan_daemon.model.vgg import VGGFeatureExtractor

LEAKY_SLOPE = 0.2
ADAIN_EPS = 1e-5


def conv3x3(in_ch: int, out_ch: int, bias: bool = True, dilation: int = 1, padding_mode: str = "circular") -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation, bias=bias, padding_mode=padding_mode)


def sn_conv3x3(in_ch: int, out_ch: int, dilation: int = 1, padding_mode: str = "circular") -> nn.Module:
    return spectral_norm(conv3x3(in_ch, out_ch, dilation=dilation, padding_mode=padding_mode))


def leaky() -> nn.LeakyReLU:
    return nn.LeakyReLU(LEAKY_SLOPE)


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor, eps: float = ADAIN_EPS) -> torch.Tensor:
    """Give `content` the per-channel mean and standard deviation of `style`.

    The deviation is the unbiased one over H*W with `eps` added to it (not to the variance), as published;
    the difference is visible wherever a channel is nearly constant.
    """

    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # squared deep features overflow half precision
        return flat.mean(2)[..., None, None], (flat.std(2) + eps)[..., None, None]

    content_mean, content_std = stats(content)
    style_mean, style_std = stats(style)
    gain = (style_std / content_std).to(content.dtype)
    return (content - content_mean.to(content.dtype)) * gain + style_mean.to(content.dtype)


class MASFFBlock(nn.Module):
    """Adaptive spatial feature fusion with a mask predicted from degraded, reference and landmark features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.attention_compressed_conv = nn.Conv2d(channels, half, 1)
        self.attention_reference_conv = nn.Conv2d(channels, half, 1)
        self.attention_landmark_conv = nn.Conv2d(channels, half, 1)
        self.attention_concatenated_conv1 = conv3x3(3 * half, channels, bias=False)
        self.attention_concatenated_bn1 = nn.BatchNorm2d(channels)
        self.attention_concatenated_conv2 = conv3x3(channels, channels, bias=False)
        self.attention_concatenated_bn2 = nn.BatchNorm2d(channels)
        self.compressed_conv1 = conv3x3(channels, channels)
        self.compressed_bn = nn.BatchNorm2d(channels)
        self.compressed_conv2 = nn.Conv2d(channels, channels, 1)
        self.reference_conv1 = conv3x3(channels, channels)
        self.reference_bn = nn.BatchNorm2d(channels)
        self.reference_conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmark: torch.Tensor) -> torch.Tensor:
        slope = LEAKY_SLOPE
        attention = torch.cat(
            [
                self.attention_compressed_conv(compressed),
                self.attention_reference_conv(reference),
                self.attention_landmark_conv(landmark),
            ],
            dim=1,
        )
        attention = F.leaky_relu(self.attention_concatenated_bn1(self.attention_concatenated_conv1(attention)), slope)
        # The mask is not squashed to [0, 1]: the published block ends in a LeakyReLU, not a sigmoid.
        mask = F.leaky_relu(self.attention_concatenated_bn2(self.attention_concatenated_conv2(attention)), slope)
        compressed = self.compressed_conv2(F.leaky_relu(self.compressed_bn(self.compressed_conv1(compressed)), slope))
        reference = self.reference_conv2(F.leaky_relu(self.reference_bn(self.reference_conv1(reference)), slope))
        return compressed + (reference - compressed) * mask


class MultiScaleDilationBlock(nn.Module):
    """Parallel dilated conv pairs, fused by one conv, added back to the input.

    The dilated convolutions pad with zeros and only the fusion conv pads circularly, as published.
    """

    def __init__(self, channels: int, dilations: tuple[int, ...] = (4, 3, 2, 1)) -> None:
        super().__init__()
        self.conv_blocks = nn.ModuleList(
            nn.Sequential(
                sn_conv3x3(channels, channels, d, padding_mode="zeros"),
                leaky(),
                sn_conv3x3(channels, channels, d, padding_mode="zeros"),
            )
            for d in dilations
        )
        self.conv_fusion = sn_conv3x3(channels * len(dilations), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_fusion(torch.cat([block(x) for block in self.conv_blocks], dim=1))


class Blur(nn.Module):
    """Depthwise [1 2 1] x [1 2 1] / 16 low-pass filter (zero padding)."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (torch.outer(k, k) / 16).view(1, 1, 3, 3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(channels, 1, 3, 3), padding=1, groups=channels)


class SFTUpBlock(nn.Module):
    """Conv, spatial feature transform by the fused features of this scale, then x2 upsampling and conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(Blur(), sn_conv3x3(in_ch, out_ch), leaky())
        self.convup = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), sn_conv3x3(out_ch, out_ch), leaky()
        )
        self.scale_block = nn.Sequential(sn_conv3x3(in_ch, out_ch), leaky(), sn_conv3x3(out_ch, out_ch))
        self.shift_block = nn.Sequential(sn_conv3x3(in_ch, out_ch), leaky(), sn_conv3x3(out_ch, out_ch), nn.Sigmoid())

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        # The published block applies a second LeakyReLU after conv1's own (negative slope 0.04 in effect).
        out = F.leaky_relu(self.conv1(x), LEAKY_SLOPE)
        out = out * self.scale_block(condition) + self.shift_block(condition)
        return self.convup(out)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv3x3(channels, channels), leaky(), conv3x3(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FullGenerator(nn.Module):
    """The published generator: forward(compressed, reference, landmarks), each N x 3 x H x W RGB in [0, 1].

    Returns the restored crop in the same form (not clamped; clamp before converting to 8 bits).
    H and W must be multiples of 16.
    """

    def __init__(self) -> None:
        super().__init__()
        c = 64  # fixed by VGG-19's widths
        self.vgg_extractor = VGGFeatureExtractor()
        # One block per VGG scale: relu2_2 (128 ch), relu3_4 (256), relu4_4 (512), conv5_4 (512).
        self.MASFF_blocks = nn.ModuleList(MASFFBlock(ch) for ch in (2 * c, 4 * c, 8 * c, 8 * c))
        self.multi_scale_dilation = MultiScaleDilationBlock(8 * c)
        self.upsample0 = SFTUpBlock(8 * c, 8 * c)
        self.upsample1 = SFTUpBlock(8 * c, 4 * c)
        self.upsample2 = SFTUpBlock(4 * c, 2 * c)
        self.upsample3 = SFTUpBlock(2 * c, c)
        self.upsample4 = nn.Sequential(
            sn_conv3x3(c, c), leaky(), ResidualBlock(c), ResidualBlock(c), conv3x3(c, 3)
        )
        self.config: dict[str, object] = {}  # constructor keywords, saved in .safetensors metadata

    def forward(self, compressed: torch.Tensor, reference: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        n, _, height, width = compressed.shape
        if height % 16 or width % 16 or reference.shape != compressed.shape or landmarks.shape != compressed.shape:
            raise ValueError(
                "FullGenerator needs three N x 3 x H x W inputs of one shape with H, W multiples of 16; got "
                f"{tuple(compressed.shape)}, {tuple(reference.shape)}, {tuple(landmarks.shape)}"
            )
        # One VGG pass over the three inputs stacked on the batch axis.
        features = self.vgg_extractor(torch.cat([compressed, reference, landmarks], dim=0))
        fused = []
        for block, feature in zip(self.MASFF_blocks, features):
            degraded, ref, landmark = feature.split(n, dim=0)
            fused.append(block(degraded, adaptive_instance_norm(ref, degraded), landmark))
        x = self.multi_scale_dilation(features[-1][:n])
        for up, condition in zip((self.upsample0, self.upsample1, self.upsample2, self.upsample3), reversed(fused)):
            x = up(x, condition)
        return compressed + self.upsample4(x)
