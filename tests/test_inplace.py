"""The derived module's ReLUs and residual adds work in place and compute the same values."""

import copy

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.models import MobileNetV2, ResNet20
from fxadapt.passes import use_inplace_operations

from conftest import randomize_batchnorm


def _derived(model, seed: int = 0):
    torch.manual_seed(seed)
    model = randomize_batchnorm(model, seed)
    wrapped = fxadapt.wrap(model, torch.randn(2, 3, 32, 32))
    return model, fxadapt.derive(wrapped)


def _targets(module, op):
    return [node.target for node in module.graph.nodes if node.op == op]


def test_resnet_relus_and_adds_work_in_place():
    _, derived = _derived(ResNet20(depth=8))
    functions = _targets(derived, "call_function")
    methods = _targets(derived, "call_method")

    # ResNet8: a stem ReLU and two per block, each after a BatchNorm or a residual add.
    assert functions.count(torch.relu_) == 7
    assert torch.relu not in functions
    assert methods.count("add_") == 3
    assert not any(isinstance(module, nn.ReLU) for module in derived.modules())


@pytest.mark.parametrize("training", [False, True])
def test_in_place_derived_equals_original(training):
    model, derived = _derived(ResNet20(depth=8), seed=1)
    images = torch.randn(4, 3, 32, 32, requires_grad=True)
    model.train(training)
    derived.train(training)

    expected = model(images)
    actual = derived(images)

    assert torch.equal(actual, expected)


def test_in_place_gradients_equal_original():
    model, derived = _derived(ResNet20(depth=8), seed=2)
    reference = copy.deepcopy(model).train()
    derived.train()
    images = torch.randn(4, 3, 32, 32)

    reference(images).square().sum().backward()
    derived(images).square().sum().backward()

    reference_gradients = dict(reference.named_parameters())
    for name, parameter in derived.named_parameters():
        assert torch.allclose(parameter.grad, reference_gradients[name].grad, atol=1e-6), name


def test_shared_tensor_relu_stays_out_of_place(example_input):
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y) + y

    traced = torch.fx.symbolic_trace(TwoReaders())
    result = use_inplace_operations(traced)

    assert torch.relu in _targets(result, "call_function")
    assert torch.relu_ not in _targets(result, "call_function")
    assert torch.equal(result(example_input), traced(example_input))


def test_mobilenet_keeps_relu6_modules():
    _, derived = _derived(MobileNetV2())

    assert any(isinstance(module, nn.ReLU6) for module in derived.modules())
    assert "add_" in _targets(derived, "call_method")
