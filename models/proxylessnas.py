"""ProxylessNAS-GPU network (Cai et al., 2019, "ProxylessNAS: Direct Neural Architecture Search
on Target Task and Hardware") with strides for 32x32 CIFAR inputs.

The file imports only torch, so `fxadapt train models/proxylessnas.py:ProxylessNAS` can load it by
path.
"""

import torch
from torch import nn

__all__ = ["MBConvBlock", "ProxylessNAS"]

# (kernel_size, expansion, out_channels, stride) of each searched block after the first MB1 block.
# The block list is the ImageNet ProxylessNAS-GPU network as tabulated in the imgclsmob
# (pytorchcv) model zoo, `proxylessnas.py`, version "gpu". The search placed a "zero" operation at
# 8 of its 21 positions, and a zero block reduces to its shortcut, so this list leaves them out.
# They are blocks 2-4 of the 32-channel stage, blocks 2-3 of the 56 and 112-channel stages and
# block 2 of the 128-channel stage. The first block of the 32-channel stage has stride 2 on
# ImageNet and stride 1 here.
_BLOCKS = (
    (5, 3, 32, 1),
    (7, 3, 56, 2),
    (3, 3, 56, 1),
    (7, 6, 112, 2),
    (5, 3, 112, 1),
    (5, 6, 128, 1),
    (3, 3, 128, 1),
    (5, 3, 128, 1),
    (7, 6, 256, 2),
    (7, 6, 256, 1),
    (7, 6, 256, 1),
    (5, 6, 256, 1),
    (7, 6, 432, 1),
)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (MBConv): 1x1 expansion, kxk depthwise, 1x1 linear projection.

    The block adds its input to the projection only when the stride is 1 and the widths match.
    With expansion 1 (an MB1 block) there is no expansion convolution.

    Args:
        in_channels: Channels of the block input.
        out_channels: Channels of the block output.
        kernel_size: Size of the square depthwise kernel, an odd number.
        stride: Stride of the depthwise convolution, 1 or 2.
        expansion: Ratio of hidden to input channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expansion: int
    ) -> None:
        super().__init__()
        hidden_channels = in_channels * expansion
        self.kernel_size = kernel_size
        self.expansion = expansion
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
                kernel_size,
                stride,
                padding=kernel_size // 2,
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


class ProxylessNAS(nn.Module):
    """ProxylessNAS-GPU network for 32x32 inputs: MBConv blocks of kernel 3, 5 or 7.

    A 3x3 stem convolution with 40 channels and an MB1 3x3 block to 24 channels feed 13 MBConv
    blocks in stages of width 32, 56, 112, 128, 256 and 432, with expansion 3 or 6. A 1x1
    convolution to 1728 channels, global average pooling and a linear layer follow. Every
    convolution is followed by BatchNorm, and by ReLU6 except the projections. Seven blocks
    keep stride 1 and width and have a residual add.

    Strides: the ImageNet network downsamples 224x224 inputs 32 times, with stride 2 at the stem
    and at the first block of the 32, 56, 112 and 256-channel stages. This version sets the stem
    and the first 32-channel block to stride 1 so that it downsamples 8 times, like the CIFAR
    ResNets. A 32x32 input then reaches the last stages at 4x4 instead of 1x1. The blocks that
    the search set to the zero operation are left out (see `_BLOCKS`). Strides do not change the
    parameter count, so with 1000 classes the network has the 7,119,848 parameters of the
    ImageNet model in the imgclsmob zoo.

    At 10 classes the network has 5.41 M parameters (5,408,138).

    Args:
        num_classes: Number of output classes.
    """

    # Read by `fxadapt train` when the user sets neither option: NAS networks on CIFAR
    # are commonly trained with Cutout 16.
    training_defaults = {"cutout": 16}

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 40, 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(40),
            nn.ReLU6(),
        )

        blocks = [MBConvBlock(40, 24, kernel_size=3, stride=1, expansion=1)]
        in_channels = 24
        for kernel_size, expansion, out_channels, stride in _BLOCKS:
            blocks.append(MBConvBlock(in_channels, out_channels, kernel_size, stride, expansion))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)

        self.head = nn.Sequential(
            nn.Conv2d(in_channels, 1728, 1, bias=False),
            nn.BatchNorm2d(1728),
            nn.ReLU6(),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1728, num_classes)

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
