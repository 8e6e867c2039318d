"""Bottleneck ResNet-50 (He et al., 2016) with a stem for 32x32 CIFAR inputs.

The file imports only torch, so `fxadapt train models/resnet50.py:ResNet50` can load it by path.
"""

import torch
from torch import nn

__all__ = ["Bottleneck", "ResNet50"]


class Bottleneck(nn.Module):
    """Bottleneck block: 1x1 reduction, 3x3 convolution, 1x1 expansion by 4, residual add.

    The stride sits on the 3x3 convolution. Where the stride or the width changes, the shortcut
    is a 1x1 convolution with BatchNorm (a projection shortcut), otherwise it is empty.

    Args:
        in_channels: Channels of the block input.
        width: Channels of the 3x3 convolution. The block outputs `4 * width` channels.
        stride: Stride of the 3x3 convolution, 1 or 2.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu3 = nn.ReLU()

        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x)

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu1(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu2(out)

        out = self.conv3(out)
        out = self.bn3(out)

        out = out + shortcut
        out = self.relu3(out)
        return out


class ResNet50(nn.Module):
    """ResNet-50 with 3, 4, 6 and 3 bottleneck blocks and a CIFAR stem.

    The stem is one 3x3 stride-1 convolution with 64 channels, BatchNorm and ReLU, without the
    ImageNet 7x7 stride-2 convolution and max-pool. Four stages of bottleneck blocks of width 64,
    128, 256 and 512 follow, stride 2 at the first block of stages 2 to 4, ending in 2048
    channels at 4x4. Global average pooling gives the 2048-d features for the linear layer.
    The 16 blocks each end in a residual add.

    At 10 classes the network has 23.5 M parameters (23,520,842).

    Args:
        num_classes: Number of output classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()

        self.layer1 = _make_stage(64, 64, 3, stride=1)
        self.layer2 = _make_stage(256, 128, 4, stride=2)
        self.layer3 = _make_stage(512, 256, 6, stride=2)
        self.layer4 = _make_stage(1024, 512, 3, stride=2)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def _make_stage(in_channels: int, width: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [Bottleneck(in_channels, width, stride)]
    for _ in range(blocks - 1):
        layers.append(Bottleneck(width * Bottleneck.expansion, width))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
