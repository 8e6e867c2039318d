"""DARTS V2 cell network for 32x32 CIFAR inputs (Liu et al., 2019, "DARTS: Differentiable
Architecture Search").

The file imports only torch, so `fxadapt train models/darts.py:DARTS` can load it by path.

The ReLUs are not in-place because every cell state feeds several operations.
"""

import torch
from torch import nn

__all__ = [
    "DARTS",
    "DARTS_V2_NORMAL",
    "DARTS_V2_REDUCE",
    "AuxiliaryHead",
    "Cell",
    "DilConv",
    "DropPath",
    "FactorizedReduce",
    "ReLUConvBN",
    "SepConv",
]

# Operation and input index for each of the 8 operations of a cell. Intermediate node i sums
# operations 2i and 2i + 1. Inputs 0 and 1 are the two cell inputs, and input 2 + j is
# intermediate node j.
DARTS_V2_NORMAL = (
    ("sep_conv_3x3", 0),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 0),
    ("sep_conv_3x3", 1),
    ("sep_conv_3x3", 1),
    ("skip_connect", 0),
    ("skip_connect", 0),
    ("dil_conv_3x3", 2),
)
DARTS_V2_REDUCE = (
    ("max_pool_3x3", 0),
    ("max_pool_3x3", 1),
    ("skip_connect", 2),
    ("max_pool_3x3", 1),
    ("max_pool_3x3", 0),
    ("skip_connect", 2),
    ("skip_connect", 2),
    ("max_pool_3x3", 1),
)


class ReLUConvBN(nn.Module):
    """ReLU, convolution and BatchNorm.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: Size of the square convolution kernel.
        stride: Stride of the convolution.
        padding: Zero padding on each side.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int
    ) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        x = self.conv(x)
        x = self.bn(x)
        return x


class DilConv(nn.Module):
    """ReLU, dilated depthwise convolution, pointwise convolution and BatchNorm.

    Args:
        channels: Channels of the input and the output.
        kernel_size: Size of the square depthwise kernel.
        stride: Stride of the depthwise convolution.
        padding: Zero padding on each side.
        dilation: Dilation of the depthwise convolution.
    """

    def __init__(
        self, channels: int, kernel_size: int, stride: int, padding: int, dilation: int
    ) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.depthwise = nn.Conv2d(
            channels,
            channels,
            kernel_size,
            stride,
            padding=padding,
            dilation=dilation,
            groups=channels,
            bias=False,
        )
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        x = self.depthwise(x)
        x = self.pointwise(x)
        x = self.bn(x)
        return x


class SepConv(nn.Module):
    """Two stacked DilConv units without dilation. Only the first one applies the stride.

    Args:
        channels: Channels of the input and the output.
        kernel_size: Size of the square depthwise kernels.
        stride: Stride of the first depthwise convolution.
        padding: Zero padding on each side.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        self.first = DilConv(channels, kernel_size, stride, padding, dilation=1)
        self.second = DilConv(channels, kernel_size, 1, padding, dilation=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        x = self.second(x)
        return x


class FactorizedReduce(nn.Module):
    """ReLU, then two stride-2 1x1 convolutions on grids offset by one pixel, concatenated.

    Each convolution gives half the output channels, so together they see every input pixel.
    The input height and width must be even, or the two halves differ in size.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output, an even number.

    Raises:
        ValueError: If `out_channels` is odd.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels % 2 != 0:
            raise ValueError(f"out_channels must be even, got {out_channels}")
        self.relu = nn.ReLU()
        self.conv_even = nn.Conv2d(in_channels, out_channels // 2, 1, 2, bias=False)
        self.conv_odd = nn.Conv2d(in_channels, out_channels // 2, 1, 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)

        even = self.conv_even(x)
        shifted = x[:, :, 1:, 1:]
        odd = self.conv_odd(shifted)

        out = torch.cat([even, odd], dim=1)
        out = self.bn(out)
        return out


class DropPath(nn.Module):
    """Drop path: zero each sample of a branch with probability `p` in training mode.

    Kept samples are scaled by 1 / (1 - p). In evaluation mode the branch passes unchanged.

    The module views the (N, C, H, W) input as one (1, N, C, H, W) volume, so that
    `nn.Dropout3d` zeroes whole samples as if they were channels. The default torch.fx tracer
    keeps every `torch.nn` module except `nn.Sequential` as a leaf, so a traced graph calls
    `nn.Dropout3d` at run time, and then it reads its current `p` and `training`. A Python
    `if self.training` test in this forward would instead run once during tracing and freeze
    the mode of that moment into the graph. The mask is drawn inside the leaf, so the branch
    stays a single chain of operations with no extra use of its output.

    Args:
        p: Probability of zeroing a sample, in [0, 1).

    Raises:
        ValueError: If `p` is outside [0, 1).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout3d(0.0)
        self.p = p

    @property
    def p(self) -> float:
        """Probability of zeroing a sample, stored in the `nn.Dropout3d` leaf."""
        return self.dropout.p

    @p.setter
    def p(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {value}")
        self.dropout.p = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        samples = x.unsqueeze(0)
        samples = self.dropout(samples)
        out = samples.squeeze(0)
        return out


def _make_operation(name: str, channels: int, stride: int) -> nn.Module:
    if name == "sep_conv_3x3":
        return SepConv(channels, 3, stride, padding=1)
    if name == "dil_conv_3x3":
        return DilConv(channels, 3, stride, padding=2, dilation=2)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, padding=1)
    if name == "skip_connect":
        if stride == 1:
            return nn.Identity()
        return FactorizedReduce(channels, channels)
    raise ValueError(
        f"unknown DARTS operation {name!r}, "
        "expected sep_conv_3x3, dil_conv_3x3, max_pool_3x3 or skip_connect"
    )


class Cell(nn.Module):
    """DARTS cell: two preprocessed inputs, four intermediate nodes and their concatenation.

    Each intermediate node is the sum of two operations on earlier states. In a reduction cell
    the operations on the two cell inputs have stride 2. Every operation except the identity
    goes through its own DropPath. An identity operation makes no call, so the traced graph
    shows its input as a direct input of the sum.

    Args:
        genotype: Operation name and input index for the 8 operations, as in `DARTS_V2_NORMAL`.
        prev_prev_channels: Channels of the output of the cell before the previous one.
        prev_channels: Channels of the output of the previous cell.
        channels: Channels of each intermediate node. The cell outputs `4 * channels`.
        reduction: Whether this cell halves the height and width.
        reduction_prev: Whether the previous cell halved them, so that the older input is
            reduced by a FactorizedReduce to match.
        drop_path_prob: Initial probability of every DropPath of the cell.
    """

    def __init__(
        self,
        genotype: tuple[tuple[str, int], ...],
        prev_prev_channels: int,
        prev_channels: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        drop_path_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(prev_prev_channels, channels)
        else:
            self.preprocess0 = ReLUConvBN(prev_prev_channels, channels, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(prev_channels, channels, 1, 1, 0)

        self.reduction = reduction
        self.num_nodes = len(genotype) // 2
        self.input_indices = tuple(index for _, index in genotype)
        self.ops = nn.ModuleList()
        self.drop_paths = nn.ModuleList()
        for name, index in genotype:
            stride = 2 if reduction and index < 2 else 1
            self.ops.append(_make_operation(name, channels, stride))
            self.drop_paths.append(DropPath(drop_path_prob))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)

        states = [s0, s1]
        for node in range(self.num_nodes):
            left = self._apply_operation(2 * node, states)
            right = self._apply_operation(2 * node + 1, states)
            states.append(left + right)

        out = torch.cat(states[2:], dim=1)
        return out

    def _apply_operation(self, position: int, states: list[torch.Tensor]) -> torch.Tensor:
        x = states[self.input_indices[position]]
        operation = self.ops[position]
        if isinstance(operation, nn.Identity):
            return x

        x = operation(x)
        x = self.drop_paths[position](x)
        return x


class AuxiliaryHead(nn.Module):
    """Auxiliary classifier on the 8x8 feature map after the second reduction cell.

    Args:
        in_channels: Channels of the feature map.
        num_classes: Number of output classes.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(in_channels, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


class DARTS(nn.Module):
    """DARTS V2 network for 32x32 inputs: a stem and a stack of normal and reduction cells.

    A 3x3 stem convolution with BatchNorm gives `3 * C` channels. `layers` cells follow, where
    the cells at `layers // 3` and `2 * layers // 3` are reduction cells that double the width
    and halve the height and width. Each cell outputs the concatenation of its 4 intermediate
    nodes, and each node is the sum of two operations, so a network of 20 cells contains 80
    sums. Global average pooling and a linear layer give the logits.

    With C=36, layers=20 and 10 classes the network has 3.35 M parameters (3,349,342), and
    3.83 M (3,825,768) with the auxiliary head.

    Drop path: every operation except the identity ends in a DropPath module. Setting
    `drop_path_prob` on this model writes the new probability into every DropPath, and
    DropPath stores it in an `nn.Dropout3d` leaf that a traced graph reads at run time.
    A GraphModule traced from this model shares those leaf modules with it, so setting
    `drop_path_prob` afterwards also changes the traced module. A deep copy has its own leaves,
    so there one sets `p` on each of its `nn.Dropout3d` modules, which are all drop paths.

    The auxiliary head runs only in training mode. Tracing freezes that choice: a graph traced
    with `auxiliary=True` in training mode always returns both outputs, and one traced in
    evaluation mode returns only the logits.

    Args:
        num_classes: Number of output classes.
        C: Channels of each intermediate node in the first cells. The stem outputs `3 * C`.
        layers: Number of cells, at least 3 so that both reduction cells exist.
        auxiliary: Whether to add the auxiliary head after the second reduction cell. In
            training mode the forward then returns `(logits, aux_logits)`.
        drop_path_prob: Initial drop path probability, in [0, 1). The trainer may change
            `drop_path_prob` between epochs.

    Raises:
        ValueError: If `layers` is smaller than 3, `C` is odd, or `drop_path_prob` is outside
            [0, 1).
    """

    # Read by `fxadapt train` when the user sets neither option: DARTS trains its CIFAR
    # networks with Cutout 16 and a drop-path probability ramped to 0.2.
    training_defaults = {"cutout": 16, "drop_path": 0.2}

    def __init__(
        self,
        num_classes: int = 10,
        C: int = 36,
        layers: int = 20,
        auxiliary: bool = False,
        drop_path_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if layers < 3:
            raise ValueError(
                f"layers must be at least 3 to place two reduction cells, got {layers}"
            )
        if C % 2 != 0:
            raise ValueError(f"C must be even because FactorizedReduce halves it, got {C}")

        stem_channels = 3 * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_channels),
        )

        reduction_indices = (layers // 3, 2 * layers // 3)
        self.auxiliary_index = reduction_indices[1]
        prev_prev_channels, prev_channels, channels = stem_channels, stem_channels, C
        reduction_prev = False
        auxiliary_channels = 0
        self.cells = nn.ModuleList()
        for index in range(layers):
            reduction = index in reduction_indices
            if reduction:
                channels *= 2
            cell_genotype = DARTS_V2_REDUCE if reduction else DARTS_V2_NORMAL
            cell = Cell(
                cell_genotype,
                prev_prev_channels,
                prev_channels,
                channels,
                reduction,
                reduction_prev,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            prev_prev_channels, prev_channels = prev_channels, cell.num_nodes * channels
            if index == self.auxiliary_index:
                auxiliary_channels = prev_channels

        self.auxiliary_head = None
        if auxiliary:
            self.auxiliary_head = AuxiliaryHead(auxiliary_channels, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev_channels, num_classes)

        self.drop_path_prob = drop_path_prob

    @property
    def drop_path_prob(self) -> float:
        """Probability with which each DropPath zeroes a sample in training mode."""
        return self._drop_path_prob

    @drop_path_prob.setter
    def drop_path_prob(self, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {value}")
        self._drop_path_prob = float(value)
        for module in self.modules():
            if isinstance(module, DropPath):
                module.p = value

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        s0 = self.stem(x)
        s1 = s0

        aux_logits = None
        for index, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if index == self.auxiliary_index and self.auxiliary_head is not None and self.training:
                aux_logits = self.auxiliary_head(s1)

        out = self.global_pooling(s1)
        out = torch.flatten(out, 1)
        logits = self.classifier(out)

        if aux_logits is not None:
            return logits, aux_logits
        return logits
