"""Derivation reproduces the mixed network with the options not chosen set to zero."""

import copy

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.models import ResNet20
from fxadapt.passes import MIXED_ROOT

from conftest import TwoBranch, randomize_batchnorm


def _set_theta(wrapped, theta_name, **values):
    module = wrapped.fxadapt_mixed[theta_name]
    with torch.no_grad():
        for option, value in values.items():
            getattr(module, f"theta_{option}").fill_(value)


def _zero_unchosen(wrapped, table):
    reference = copy.deepcopy(wrapped)
    with torch.no_grad():
        for edge in table.edges:
            module = reference.fxadapt_mixed[edge.theta]
            for option in edge.options:
                if option not in (edge.decision, "none"):
                    getattr(module, f"theta_{option}").fill_(0.0)
    return reference


@pytest.fixture
def decided_resnet():
    torch.manual_seed(0)
    wrapped = fxadapt.wrap(randomize_batchnorm(ResNet20()), torch.randn(2, 3, 32, 32)).eval()
    _set_theta(wrapped, "e0", same=-0.5, identity=0.7)  # identity
    _set_theta(wrapped, "e2", same=-0.3, identity=-0.2)  # none
    _set_theta(wrapped, "e4", same=0.6)  # same, folded into bn2
    _set_theta(wrapped, "e5", same=-0.1)  # shortcut none
    _set_theta(wrapped, "e9", same=0.8)  # shortcut same, a scale stays
    derived = fxadapt.derive(wrapped)
    return wrapped, derived, fxadapt.edge_table(derived)


def test_decisions_follow_theta(decided_resnet):
    _, _, table = decided_resnet
    decisions = table.decisions()

    assert decisions[0] == "identity"
    assert decisions[2] == "none"
    assert decisions[4] == "same"
    assert decisions[5] == "none"
    assert decisions[9] == "same"
    assert sum(decision == "same" for decision in decisions.values()) == 15


def test_derived_equals_mixed_with_zeroed_theta(decided_resnet):
    wrapped, derived, table = decided_resnet
    reference = _zero_unchosen(wrapped, table).eval()
    example = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))

    with torch.no_grad():
        difference = (derived.eval()(example) - reference(example)).abs().max().item()

    assert difference <= 1e-5


def test_derived_equals_mixed_in_training_mode(decided_resnet):
    wrapped, derived, table = decided_resnet
    reference = _zero_unchosen(wrapped, table).train()
    example = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    with torch.no_grad():
        difference = (derived.train()(example) - reference(example)).abs().max().item()

    assert difference <= 1e-5


def test_derived_has_no_theta_and_fewer_parameters(decided_resnet):
    wrapped, derived, _ = decided_resnet
    original_parameters = sum(p.numel() for p in ResNet20().parameters())
    derived_parameters = sum(p.numel() for p in derived.parameters())
    block_parameters = sum(p.numel() for p in wrapped.get_submodule("layer1.0").parameters())

    assert not hasattr(derived, MIXED_ROOT)
    assert "fxadapt" not in derived.code
    assert derived_parameters == original_parameters - 2 * block_parameters


def test_theta_same_is_folded_into_batchnorm(decided_resnet):
    wrapped, derived, _ = decided_resnet

    derived_bn = derived.get_submodule("layer1.2.bn2")
    wrapped_bn = wrapped.get_submodule("layer1.2.bn2")

    assert torch.allclose(derived_bn.weight, 0.6 * wrapped_bn.weight)
    assert torch.allclose(derived_bn.bias, 0.6 * wrapped_bn.bias)


def test_scale_without_layer_folds_into_add(decided_resnet):
    _, derived, _ = decided_resnet
    # An add into a BatchNorm's output works in place, so it is an add_ call.
    alphas = [
        node.kwargs.get("alpha")
        for node in derived.graph.nodes
        if node.target is torch.add or node.target == "add_"
    ]
    multiplies = [node for node in derived.graph.nodes if node.target is torch.mul]

    assert pytest.approx(0.8) in alphas
    assert pytest.approx(0.7) in alphas
    assert multiplies == []


def test_default_theta_derives_the_original(example_input):
    model = randomize_batchnorm(TwoBranch()).eval()
    derived = fxadapt.derive(fxadapt.wrap(model, example_input)).eval()

    with torch.no_grad():
        assert torch.equal(derived(example_input), model(example_input))
    assert sum(p.numel() for p in derived.parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_given_decisions_override_theta(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    derived = fxadapt.derive(wrapped, {0: "identity", 1: "same"})

    assert fxadapt.edge_table(derived).decisions() == {0: "identity", 1: "same"}
    assert not hasattr(derived, "conv")


def test_decision_outside_options_is_rejected(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)

    with pytest.raises(ValueError, match="not one of its options"):
        fxadapt.derive(wrapped, {0: "same", 1: "identity"})


def test_derive_leaves_wrapped_unchanged(decided_resnet):
    wrapped, _, _ = decided_resnet

    assert hasattr(wrapped, MIXED_ROOT)
    assert wrapped.fxadapt_mixed["e0"].theta()["identity"] == pytest.approx(0.7)
    assert hasattr(wrapped.get_submodule("layer1.0"), "conv1")


def test_ties_go_to_the_conservative_option(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    _set_theta(wrapped, "e0", same=0.0, identity=0.0)
    _set_theta(wrapped, "e1", same=0.0)
    decisions = fxadapt.edge_table(fxadapt.derive(wrapped)).decisions()

    assert decisions == {0: "same", 1: "same"}


class BatchNormSiLU(nn.BatchNorm2d):
    """A BatchNorm and a SiLU in one module, as timm's BatchNormAct2d."""

    def forward(self, x):
        return nn.functional.silu(super().forward(x))


class SiLUBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = BatchNormSiLU(3)

    def forward(self, x):
        return x + self.bn(self.conv(x))


def test_scale_skips_batchnorm_subclass(example_input):
    wrapped = fxadapt.wrap(randomize_batchnorm(SiLUBranch()), example_input).eval()
    branch = next(edge for edge in fxadapt.edge_table(wrapped).edges if edge.nodes)
    _set_theta(wrapped, branch.theta, same=0.5)
    derived = fxadapt.derive(wrapped).eval()

    with torch.no_grad():
        assert torch.allclose(derived(example_input), wrapped(example_input), atol=1e-6)
    assert torch.equal(derived.get_submodule("bn").weight, wrapped.get_submodule("bn").weight)
