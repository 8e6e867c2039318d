"""Edges, options, cells and theta groups found by the analysis."""

import torch
from torch import nn

from fxadapt.analysis import analyse
from fxadapt.models import ResNet20
from fxadapt.tracing import propagate_shapes, trace

from conftest import TwoBranch


def _table(model, example, **options):
    traced = trace(model)
    propagate_shapes(traced.graph_module, example)
    return analyse(traced.graph_module, **options), traced.graph_module


def test_resnet20_has_eighteen_edges():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32))
    branches = [edge for edge in table.edges if edge.ops and edge.ops[0].startswith("Conv2d")]
    shortcuts = [edge for edge in table.edges if edge not in branches]

    assert len(table.edges) == 18
    assert len(branches) == 9
    assert sum("identity" in edge.options for edge in branches) == 7
    assert all("none" in edge.options for edge in table.edges)
    assert sum(edge.is_empty for edge in shortcuts) == 7
    assert not any("identity" in edge.options for edge in shortcuts)


def test_resnet20_cell_scope_has_four_theta_groups():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32), scope="cell")

    assert len(table.cell_types) == 2
    assert sorted(len(cells) for cells in table.cell_types.values()) == [2, 7]
    assert len(table.theta_groups()) == 4


def test_resnet20_full_scope_gives_each_edge_a_theta():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32))

    assert len(table.theta_groups()) == 18


def test_identity_never_offered_for_shape_change():
    table, graph_module = _table(ResNet20(), torch.randn(2, 3, 32, 32))
    shapes = {
        node.name: tuple(node.meta["tensor_meta"].shape)
        for node in graph_module.graph.nodes
        if "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")
    }

    for edge in table.edges:
        same_shape = shapes[edge.entry] == shapes[edge.exit]
        assert ("identity" in edge.options) == (same_shape and not edge.is_empty), edge.name


class Chain(nn.Module):
    """Shape-preserving layers with no merge: nothing to adapt at branch granularity."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 3, 3, padding=1)
        self.second = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_no_edges_without_merges(example_input):
    table, _ = _table(Chain(), example_input)

    assert table.edges == []


class GatedBlock(nn.Module):
    """A residual block whose branch holds a squeeze-excitation gate, plus a bias add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = nn.Conv2d(3, 3, 1)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x):
        h = self.conv(x)
        h = h * torch.sigmoid(self.gate(h.mean(dim=(2, 3), keepdim=True)))
        out = h + x
        return out + self.bias


def test_gate_and_bias_are_not_merges(example_input):
    table, _ = _table(GatedBlock(), example_input)
    merges = [node for node in table.nas_nodes if node.kind == "merge"]

    assert len(merges) == 1
    assert len(table.edges) == 2
    assert "mul" in table.edges[0].ops


class ThreeWaySum(nn.Module):
    """A sum of three branches written as a + b + c and as Python's sum."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))

    def forward(self, x):
        first = self.convs[0](x) + self.convs[1](x) + self.convs[2](x)
        return sum([first, x, torch.relu(first)])


def test_chained_adds_form_one_merge(example_input):
    table, _ = _table(ThreeWaySum(), example_input)
    merges = [node for node in table.nas_nodes if node.kind == "merge"]

    assert [merge.inputs for merge in merges] == [3, 3]
    assert len(table.edges) == 6


def test_edges_end_in_merges(example_input):
    table, _ = _table(TwoBranch(), example_input)
    merge_names = {node.name for node in table.nas_nodes if node.kind == "merge"}

    assert len(table.edges) == 2
    assert all(edge.merge in merge_names for edge in table.edges)
    assert table.edges[0].ops == ["Conv2d(3x3)", "BatchNorm2d"]
    assert table.edges[0].options == ["same", "identity", "none"]
    assert table.edges[1].options == ["same", "none"]


def test_layer_granularity_cuts_after_layer_groups():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32), granularity="layer")
    layer_edges = [edge for edge in table.edges if not edge.merge]

    assert len(table.edges) == 25
    assert len(layer_edges) == 7
    assert all(edge.options == ["same", "identity"] for edge in layer_edges)
    assert all(edge.ops == ["Conv2d(3x3)", "BatchNorm2d", "ReLU"] for edge in layer_edges)
    assert all(edge.cell.startswith("layer") for edge in layer_edges)


def test_layer_granularity_shortens_merge_edges():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32), granularity="layer")
    first_branch = next(edge for edge in table.edges if edge.merge and edge.ops)

    assert first_branch.ops == ["Conv2d(3x3)", "BatchNorm2d"]


def test_shortcuts_join_same_shaped_nas_nodes():
    table, _ = _table(ResNet20(), torch.randn(2, 3, 32, 32), shortcuts=True)
    shortcuts = [edge for edge in table.edges if edge.shortcut]

    assert len(shortcuts) == 4
    assert all(edge.options == ["identity", "none"] for edge in shortcuts)
    assert all(edge.input_shape == edge.output_shape for edge in shortcuts)
    assert [edge.cell for edge in shortcuts] == ["layer1.1", "layer1.2", "layer2.2", "layer3.2"]
