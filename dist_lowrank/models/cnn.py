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


class LeNet5(nn.Module):
    """The LeNet-5 of Caffe and of the DLRT paper (430,500 weights): conv 5×5 1→20, pool, conv 5×5 20→50, pool,
    fc 800→500, fc 500→10, ReLU."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.fc1, self.fc2 = nn.Linear(800, 500), nn.Linear(500, num_classes)
        self.pool, self.act = nn.MaxPool2d(2), nn.ReLU()

    def forward(self, x):
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.fc2(self.act(self.fc1(x.flatten(1))))
