"""Shared fixtures: small models with known edges, and the path of the shared CIFAR-10."""

import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CIFAR_TARBALL = SHARED_DATA / "cifar10-jpeg.tar.gz"


class TwoBranch(nn.Module):
    """A stem, one residual block with a conv branch and an empty shortcut, and a head."""

    def __init__(self, channels: int = 4, num_classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        out = self.bn(self.conv(x))
        out = out + x
        out = torch.relu(out)
        return self.head(out.mean(dim=(2, 3)))


@pytest.fixture(autouse=True)
def _default_malloc(monkeypatch):
    """Keeps glibc's malloc defaults in the test process, which runs many trainings.

    ``fxadapt train`` changes them for the rest of its process. tests/test_allocator.py
    checks that call in processes of its own.
    """
    import fxadapt.cli

    monkeypatch.setattr(fxadapt.cli, "keep_freed_memory", lambda: False)


@pytest.fixture
def example_input():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every BatchNorm random statistics and affine weights, so eval mode is not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                size = layer.num_features
                layer.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                if layer.affine:
                    layer.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                    layer.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return module


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """Unpacks the shared CIFAR-10 JPEG tree once per test session."""
    if not CIFAR_TARBALL.is_file():
        pytest.skip(f"real CIFAR-10 not available: {CIFAR_TARBALL} is absent")
    root = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(CIFAR_TARBALL) as archive:
        archive.extractall(root, filter="data")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A decoded-image cache private to the test session."""
    return tmp_path_factory.mktemp("cache")
