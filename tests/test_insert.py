"""The wrapped network computes what the original computes, on every model of the zoo."""

import pytest
import torch

import fxadapt
from fxadapt.models import DARTS, MobileNetV2, ProxylessNAS, ResNet20, ResNet50

from conftest import TwoBranch, randomize_batchnorm

ZOO = {
    "ResNet20": lambda: ResNet20(),
    "MobileNetV2": lambda: MobileNetV2(),
    "DARTS": lambda: DARTS(C=8, layers=5),
    "ProxylessNAS": lambda: ProxylessNAS(),
    "ResNet50": lambda: ResNet50(),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_wrapped_equals_original_at_init(name):
    model = randomize_batchnorm(ZOO[name]()).eval()
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    wrapped = fxadapt.wrap(model, example).eval()

    with torch.no_grad():
        difference = (wrapped(example) - model(example)).abs().max().item()

    assert len(fxadapt.edge_table(wrapped).edges) > 0
    assert difference <= 1e-6


def test_wrap_does_not_share_weights(example_input):
    model = TwoBranch()
    wrapped = fxadapt.wrap(model, example_input)
    with torch.no_grad():
        wrapped.conv.weight.add_(1.0)

    assert not torch.equal(wrapped.conv.weight, model.conv.weight)


def test_theta_starts_at_same(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    branch, shortcut = wrapped.fxadapt_mixed["e0"], wrapped.fxadapt_mixed["e1"]

    assert branch.theta() == {"same": 1.0, "identity": 0.0, "none": 0.0}
    assert shortcut.theta() == {"same": 1.0, "none": 0.0}


def test_theta_none_is_a_buffer(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    parameter_names = {name for name, _ in wrapped.named_parameters()}
    buffer_names = {name for name, _ in wrapped.named_buffers()}

    assert "fxadapt_mixed.e0.theta_none" in buffer_names
    assert "fxadapt_mixed.e0.theta_none" not in parameter_names
    assert "fxadapt_mixed.e0.theta_identity" in parameter_names


def test_parameters_split_into_weights_and_theta(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    thetas = fxadapt.arch_parameters(wrapped)
    weights = fxadapt.weight_parameters(wrapped)

    assert len(thetas) == 3
    assert len(weights) + len(thetas) == len(list(wrapped.parameters()))
    assert not {id(p) for p in thetas} & {id(p) for p in weights}


def test_cell_scope_shares_one_module():
    wrapped = fxadapt.wrap(ResNet20(), torch.randn(2, 3, 32, 32), scope="cell")
    targets = [
        node.target
        for node in wrapped.graph.nodes
        if node.op == "call_module" and node.target.startswith("fxadapt_mixed.")
    ]

    assert len(targets) == 18
    assert len(set(targets)) == 4


def test_theta_gets_gradient_only_from_admitted_options(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    wrapped(example_input).sum().backward()

    assert wrapped.fxadapt_mixed["e0"].theta_same.grad is not None
    assert wrapped.fxadapt_mixed["e0"].theta_identity.grad is not None
    assert not hasattr(wrapped.fxadapt_mixed["e1"], "theta_identity")
