"""A small VGG-style CNN for 28×28 grey images (Fashion-MNIST): conv blocks then a two-layer head."""
from __future__ import annotations

from torch import nn


class VGGSmall(nn.Module):
    """conv(1→w)·conv(w→2w)·pool·conv(2w→4w)·conv(4w→4w)·pool·fc(4w·49→hidden)·fc(hidden→classes)."""

    def __init__(self, width: int = 32, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(1, width), *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 4 * width), *block(4 * width, 4 * width), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * width * 49, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))
