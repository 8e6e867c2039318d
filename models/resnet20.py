"""CIFAR ResNet of He et al. (2016) with 6n+2 layers: ResNet20, ResNet32, ResNet56 and deeper.

The file imports only torch, so `fxadapt train models/resnet20.py:ResNet20` can load it by path.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet20", "SubsamplePadShortcut"]


class SubsamplePadShortcut(nn.Module):
    """Parameter-free downsampling shortcut ("option A" of He et al., 2016).

    The shortcut keeps every second row and column and pads the missing channels with zeros,
    half before and half after the input channels.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output, at least `in_channels`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) is smaller than in_channels ({in_channels}), "
                "but a zero-padding shortcut can only add channels"
            )
        extra_channels = out_channels - in_channels
        self.pad_front = extra_channels // 2
        self.pad_back = extra_channels - self.pad_front

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        x = F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual add.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output.
        stride: Stride of the first convolution, 1 or 2.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()

        # An empty shortcut keeps the identity skip an empty chain in the traced graph.
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = SubsamplePadShortcut(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu1(out)

        out = self.conv2(out)
        out = self.bn2(out)

        out = out + shortcut
        out = self.relu2(out)
        return out


class ResNet20(nn.Module):
    """CIFAR ResNet with three stages of basic blocks (He et al., 2016).

    A 3x3 stem convolution with 16 channels feeds three stages of n basic blocks each, with 16,
    32 and 64 channels. The first block of stages 2 and 3 has stride 2 and a parameter-free
    shortcut that subsamples and zero-pads (option A). Global average pooling and a linear
    layer follow. Convolution and linear weights use Kaiming normal initialization.

    At depth 20 and 10 classes the network has 0.27 M parameters (269,722) and 9 residual adds.

    Args:
        num_classes: Number of output classes.
        depth: Number of weighted layers, 6n + 2 (20, 32, 44, 56, 110, ...).

    Raises:
        ValueError: If `depth` is not of the form 6n + 2 with n >= 1.
    """

    def __init__(self, num_classes: int = 10, depth: int = 20) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 56, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6

        self.conv1 = nn.Conv2d(3, 16, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()

        self.layer1 = _make_stage(16, 16, blocks_per_stage, stride=1)
        self.layer2 = _make_stage(16, 32, blocks_per_stage, stride=2)
        self.layer3 = _make_stage(32, 64, blocks_per_stage, stride=2)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def _make_stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride)]
    for _ in range(blocks - 1):
        layers.append(BasicBlock(out_channels, out_channels))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
