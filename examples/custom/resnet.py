"""A model factory and a loss: a small ResNet-style CNN (GroupNorm, so that a batch's
statistics never depend on how it is split across workers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(h)))


class ResNet(nn.Module):
    def __init__(self, in_channels: int, classes: int, width: int, blocks: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.GroupNorm(4, width)
        )
        stages = []
        for i in range(blocks):
            stages += [Residual(width)] + ([nn.MaxPool2d(2)] if i < blocks - 1 else [])
        self.body = nn.Sequential(*stages)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        h = self.body(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))  # (B, classes)


def build(data, width: int = 16, blocks: int = 2, classes: int = 4) -> nn.Module:
    """``data`` is what ``shapes.load`` returned; the input channels come from it."""
    channels = data.train[0][0].shape[0]
    return ResNet(channels, classes, width, blocks)


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with a little label smoothing."""
    return F.cross_entropy(outputs, targets, label_smoothing=0.05)
