"""Folding theta scales: into an affine layer where one computes the value, else into the add."""

import operator

import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxadapt.passes.fold import THETA_SCALE, fold_theta_scales


class ScaledShortcut(nn.Module):
    def forward(self, x, y):
        return torch.relu(y) + torch.mul(x, 0.8)


class ScaledFirst(nn.Module):
    def forward(self, x, y):
        return torch.mul(x, 0.8) + torch.relu(y)


class BothScaled(nn.Module):
    def forward(self, x, y):
        return torch.mul(x, 0.8) + torch.mul(y, 0.6)


class ScaleIntoRelu(nn.Module):
    def forward(self, x, y):
        return torch.relu(torch.mul(x, 0.8)) + y


class ScaleAfterNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x, y):
        return torch.mul(self.norm(x), 0.8) + torch.mul(y, 0.6)


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 4, 4, generator=generator), torch.randn(
        2, 3, 4, 4, generator=generator
    )


def _marked(module: nn.Module) -> torch.fx.GraphModule:
    """Traces ``module``, marks every torch.mul as a theta scale and records shapes."""
    graph_module = torch.fx.symbolic_trace(module)
    for node in graph_module.graph.nodes:
        if node.target is torch.mul:
            node.meta["fxadapt"] = {THETA_SCALE: True}
    ShapeProp(graph_module).propagate(*_inputs())
    return graph_module


def _in_place(graph_module: torch.fx.GraphModule, scaled_position: int) -> torch.fx.GraphModule:
    """Turns the add of ``graph_module`` into ``+=`` with the scale at ``scaled_position``."""
    for node in graph_module.graph.nodes:
        if node.target is operator.add:
            node.target = operator.iadd
            if scaled_position == 1 and node.args[0].target is torch.mul:
                node.args = (node.args[1], node.args[0])
    graph_module.recompile()
    return graph_module


def _targets(graph_module: torch.fx.GraphModule) -> list:
    return [node.target for node in graph_module.graph.nodes if node.op != "placeholder"]


def _max_difference(first: nn.Module, second: nn.Module) -> float:
    with torch.no_grad():
        return (first(*_inputs()) - second(*_inputs())).abs().max().item()


def test_scale_folds_into_add_alpha():
    graph_module = _marked(ScaledShortcut())

    folded = fold_theta_scales(graph_module)
    adds = [node for node in folded.graph.nodes if node.target is torch.add]

    assert torch.mul not in _targets(folded)
    assert len(adds) == 1
    assert adds[0].kwargs == {"alpha": 0.8}
    assert _max_difference(folded, graph_module) <= 1e-6


def test_scale_folds_when_first_operand():
    graph_module = _marked(ScaledFirst())

    folded = fold_theta_scales(graph_module)

    assert torch.mul not in _targets(folded)
    assert _max_difference(folded, graph_module) <= 1e-6


def test_fold_leaves_input_unchanged():
    graph_module = _marked(ScaledShortcut())

    fold_theta_scales(graph_module)

    assert torch.mul in _targets(graph_module)


def test_in_place_add_keeps_writing_its_target():
    graph_module = _in_place(_marked(ScaledShortcut()), scaled_position=1)

    folded = fold_theta_scales(graph_module)

    assert "add_" in _targets(folded)
    assert torch.mul not in _targets(folded)
    assert _max_difference(folded, ScaledShortcut()) <= 1e-6


def test_in_place_add_into_scale_becomes_add():
    graph_module = _in_place(_marked(ScaledFirst()), scaled_position=0)

    folded = fold_theta_scales(graph_module)

    assert torch.add in _targets(folded)
    assert operator.iadd not in _targets(folded)
    assert _max_difference(folded, ScaledFirst()) <= 1e-6


def test_two_scales_keep_one_multiply():
    graph_module = _marked(BothScaled())

    folded = fold_theta_scales(graph_module)

    assert _targets(folded).count(torch.mul) == 1
    assert _max_difference(folded, graph_module) <= 1e-6


def test_affine_layer_takes_its_scale_first():
    graph_module = _marked(ScaleAfterNorm().eval())

    folded = fold_theta_scales(graph_module)
    adds = [node for node in folded.graph.nodes if node.target is torch.add]

    assert torch.mul not in _targets(folded)
    assert adds[0].kwargs == {"alpha": 0.6}
    assert torch.allclose(folded.norm.weight, torch.full((3,), 0.8))
    assert _max_difference(folded.eval(), graph_module.eval()) <= 1e-6


def test_scale_feeding_other_operation_stays():
    graph_module = _marked(ScaleIntoRelu())

    folded = fold_theta_scales(graph_module)

    assert torch.mul in _targets(folded)
