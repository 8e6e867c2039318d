"""Model zoo: plain PyTorch networks for 32x32 inputs that torch.fx traces as a whole.

Each module imports only torch, so the command line can also load a file by path, for example
`fxadapt train models/resnet20.py:ResNet20`.
"""

from .darts import DARTS
from .mobilenetv2 import MobileNetV2
from .proxylessnas import ProxylessNAS
from .resnet20 import ResNet20
from .resnet50 import ResNet50

__all__ = ["DARTS", "MobileNetV2", "ProxylessNAS", "ResNet20", "ResNet50"]
