"""The PyTorch tutorial's U-Net ("How to Implement UNet in PyTorch for Image Segmentation from
Scratch"), written from its description with its typos fixed (as printed, its code does not
run: missing commas, and `padding` passed where Conv2d takes `stride`). Its parameter names
are the tutorial's, as its users' checkpoints have them."""

from __future__ import annotations

import torch
import torch.nn as nn

from conftest import randomize_batchnorm


class DoubleConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding=0):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Encoder(nn.Module):
    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.encoder_blocks = nn.ModuleList()
        for i in range(len(channels) - 1):
            self.encoder_blocks.append(DoubleConvBlock(channels[i], channels[i + 1]))
            if i < len(channels) - 2:
                self.encoder_blocks.append(nn.MaxPool2d(kernel_size=2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.encoder_blocks:
            x = block(x)
            if isinstance(block, DoubleConvBlock):
                features.append(x)
        return features


class Decoder(nn.Module):
    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.decoder_blocks = nn.ModuleList()
        for i in range(len(channels) - 1):
            self.decoder_blocks.append(nn.ConvTranspose2d(channels[i], channels[i + 1], 2, 2))
            self.decoder_blocks.append(DoubleConvBlock(channels[i], channels[i + 1]))

    @staticmethod
    def _center_crop(feature: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _, _, H, W = target.shape
        _, _, h, w = feature.shape
        top, left = (h - H) // 2, (w - W) // 2
        return feature[:, :, top : top + H, left : left + W]

    def forward(self, x: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        for i, block in enumerate(self.decoder_blocks):
            if isinstance(block, DoubleConvBlock):
                x = torch.cat([x, self._center_crop(features[i // 2], x)], dim=1)
            x = block(x)
        return x


class TutorialUNet(nn.Module):
    def __init__(self, channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.encoder = Encoder(channels)
        self.decoder = Decoder(channels[::-1][:-1])
        self.output = nn.Conv2d(channels[1], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)[::-1]
        return self.output(self.decoder(features[0], features[1:]))


def tutorial_unet(
    channels: list[int] | tuple[int, ...] = (1, 4, 8, 16), out_channels: int = 1
) -> TutorialUNet:
    """Random weights, conv biases included, and BatchNorm statistics that are not identities."""
    torch.manual_seed(1)
    net = TutorialUNet(list(channels), out_channels)
    return randomize_batchnorm(net, seed=1).eval()
