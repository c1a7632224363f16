"""The U-Net of Ronneberger et al. (2015): valid 3x3 convolutions, so the output is smaller
than the input and every output pixel sees its full receptive field (no zero padding).

This module imports nothing of the package: the BioImage Model Zoo export ships it, as it
is, as the architecture of its packages (interop/bioimageio_weights.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    # channels[0] is the image's channel count; each further entry is one level, the last one
    # the bottleneck. len(channels) - 2 is the depth (number of poolings).
    channels: tuple[int, ...] = (3, 64, 128, 256, 512, 1024)
    out_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) < 3:
            raise ValueError("channels needs the input channels and at least two levels")
        if any(c < 1 for c in self.channels) or self.out_channels < 1:
            raise ValueError("channel counts must be positive")

    @property
    def in_channels(self) -> int:
        return self.channels[0]

    @property
    def depth(self) -> int:
        return len(self.channels) - 2


class DoubleConv(nn.Sequential):
    """(conv 3x3 valid -> BN -> ReLU) x 2; shrinks each side by 2 pixels."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, kernel_size=3, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """2x2 max-pool, then a double conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class Up(nn.Module):
    """2x2 stride-2 transposed conv halving the channels, concatenation with the centre-cropped
    encoder feature, then a double conv."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_ch, out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, out_ch, 2h, 2w)
        skip = center_crop(skip, x.shape[-2], x.shape[-1])  # (N, out_ch, 2h, 2w)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """`UNet(channels=[3, 64, 128, 256, 512, 1024], out_channels=1)` maps (1, 3, 572, 572) to
    (1, 1, 388, 388). Returns logits; see `core.geometry` for legal sizes."""

    def __init__(
        self,
        channels: list[int] | tuple[int, ...] = (3, 64, 128, 256, 512, 1024),
        out_channels: int = 1,
    ) -> None:
        super().__init__()
        self.config = UNetConfig(tuple(channels), out_channels)
        ch = self.config.channels
        self.inc = DoubleConv(ch[0], ch[1])
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1]) for i in range(1, len(ch) - 1))
        self.ups = nn.ModuleList(Up(ch[i + 1], ch[i]) for i in reversed(range(1, len(ch) - 1)))
        self.head = nn.Conv2d(ch[1], out_channels, kernel_size=1)

    @property
    def depth(self) -> int:
        return self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inc(x)  # (N, c1, H-4, W-4)
        skips = []
        for down in self.downs:
            skips.append(x)
            x = down(x)  # (N, c_{i+1}, H_i/2 - 4, W_i/2 - 4)
        for up, skip in zip(self.ups, reversed(skips), strict=True):
            x = up(x, skip)  # (N, c_i, 2h - 4, 2w - 4)
        return self.head(x)  # (N, out_channels, H - shrink, W - shrink)


def to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(N, K, ...) logits -> probabilities: the sigmoid for one class, the softmax over the K
    classes for several."""
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


class UNetProbabilities(UNet):
    """The U-Net with its final activation (`to_probabilities`), for runtimes that take the
    network whole: the BioImage Model Zoo's packages, whose consumers then get probabilities
    without a postprocessing step of their own. Same parameters, same state dict as `UNet`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return to_probabilities(super().forward(x))
