"""MobileNetV2 (Sandler et al., 2018) in the common variant for 32x32 CIFAR inputs.

The file imports only torch, so `fxadapt train models/mobilenetv2.py:MobileNetV2` can load it by
path.
"""

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2"]

# (expansion, out_channels, blocks, stride of the first block) for each stage. The ImageNet
# network has stride 2 at its stem and at the 24-channel stage. The CIFAR variant sets both to 1,
# so a 32x32 input leaves the last stage at 4x4.
_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Inverted residual block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection.

    The block adds its input to the projection only when the stride is 1 and the widths match.
    There are no projection shortcuts. With expansion 1 the block has no expansion convolution.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output.
        stride: Stride of the depthwise convolution, 1 or 2.
        expansion: Ratio of hidden to input channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels

        self.expand = None
        if expansion != 1:
            self.expand = nn.Sequential(
                nn.Conv2d(in_channels, hidden_channels, 1, bias=False),
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU6(),
            )
        self.depthwise = nn.Sequential(
            nn.Conv2d(
                hidden_channels,
                hidden_channels,
                3,
                stride,
                padding=1,
                groups=hidden_channels,
                bias=False,
            ),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            out = self.expand(out)

        out = self.depthwise(out)
        out = self.project(out)

        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs, with 7 stages of inverted residual blocks.

    A stride-1 3x3 stem convolution with 32 channels feeds 17 inverted residual blocks
    (expansion, channels, blocks, stride: (1,16,1,1) (6,24,2,1) (6,32,3,2) (6,64,4,2) (6,96,3,1)
    (6,160,3,2) (6,320,1,1)), then a 1x1 convolution to 1280 channels, global average pooling and
    a linear layer. Every convolution is followed by BatchNorm, and by ReLU6 except the
    projections. Ten blocks keep stride 1 and width and have a residual add.

    At 10 classes the network has 2.24 M parameters (2,236,682).

    Args:
        num_classes: Number of output classes.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU6(),
        )

        blocks = []
        in_channels = 32
        for expansion, out_channels, num_blocks, first_stride in _STAGES:
            for index in range(num_blocks):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)

        self.head = nn.Sequential(
            nn.Conv2d(in_channels, 1280, 1, bias=False),
            nn.BatchNorm2d(1280),
            nn.ReLU6(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, num_classes)

        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)

        x = self.blocks(x)

        x = self.head(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def _init_weights(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)
