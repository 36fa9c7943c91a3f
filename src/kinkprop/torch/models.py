"""Small reference networks in torch for tests and benchmarks: an MLP, a VGG-style CNN and a
ResNet (ResNet-18 by default), each with or without batch-norm.

They use the modules whose kinks kinkprop reroutes: ``nn.ReLU`` (in place in the ResNet, as
torchvision writes it) and ``nn.MaxPool2d``. Without batch-norm the normalisation layers become
``nn.Identity`` and the convolutions get biases.
"""

from __future__ import annotations

import torch.nn as nn


def _norm2d(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class MLP(nn.Sequential):
    """Flatten, then ``Linear -> [BatchNorm1d] -> ReLU`` per hidden width, then a linear head."""

    def __init__(self, in_features: int, num_classes: int, widths=(256, 128),
                 batch_norm: bool = False):
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for w in widths:
            layers.append(nn.Linear(prev, w, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(w))
            layers.append(nn.ReLU())
            prev = w
        layers.append(nn.Linear(prev, num_classes))
        super().__init__(*layers)


class VGG(nn.Module):
    """VGG-style: stages of ``(conv3x3 -> [BN] -> ReLU) x convs`` closed by a 2x2 max-pool, then
    global average pooling and a linear head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, channels=(32, 64, 128),
                 convs_per_stage: int = 2, batch_norm: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(prev, c, 3, padding=1, bias=not batch_norm),
                           _norm2d(c, batch_norm), nn.ReLU()]
                prev = c
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, batch_norm: bool = True):
        super().__init__()
        bias = not batch_norm
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=bias)
        self.bn1 = _norm2d(channels, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.bn2 = _norm2d(channels, batch_norm)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=bias),
                _norm2d(channels, batch_norm))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with basic blocks; ``blocks=(2, 2, 2, 2)`` and ``width=64`` is ResNet-18 (11.7M
    parameters with 1000 classes, 11.2M with 10).

    ``stem="imagenet"``: 7x7 stride-2 convolution and a 3x3 stride-2 max-pool (as torchvision);
    ``"cifar"``: one 3x3 convolution, no pooling (for 32x32 inputs)."""

    def __init__(self, num_classes: int = 10, blocks=(2, 2, 2, 2), width: int = 64,
                 in_channels: int = 3, batch_norm: bool = True, stem: str = "imagenet"):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3, bias=not batch_norm),
                _norm2d(width, batch_norm), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, 1, 1, bias=not batch_norm),
                _norm2d(width, batch_norm), nn.ReLU(inplace=True))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        stages = []
        prev = width
        for i, n in enumerate(blocks):
            c = width * 2 ** i
            stage = [BasicBlock(prev, c, 1 if i == 0 else 2, batch_norm)]
            stage += [BasicBlock(c, c, 1, batch_norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            prev = c
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.extra = nn.Sequential(*stages[4:])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.extra(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(num_classes: int = 10, batch_norm: bool = True, stem: str = "imagenet",
             width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 (basic blocks 2-2-2-2)."""
    return ResNet(num_classes, (2, 2, 2, 2), width, in_channels, batch_norm, stem)
