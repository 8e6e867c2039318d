"""Tracing with leaf fallback, module paths, and the error for an untraceable root."""

import pytest
import torch
from torch import nn

from fxadapt.errors import TraceError
from fxadapt.tracing import trace


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y * 2
        return y


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.Identity(), DataDependent())

    def forward(self, x):
        x = self.stem(x)
        return torch.relu(self.block(x) + x)


def test_untraceable_submodule_becomes_leaf(example_input):
    model = Outer().eval()
    result = trace(model)
    targets = [node.target for node in result.graph_module.graph.nodes if node.op == "call_module"]

    assert list(result.leaves) == ["block.1"]
    assert "control flow" in result.leaves["block.1"]
    assert "block.1" in targets
    assert torch.allclose(result.graph_module(example_input), model(example_input))


def test_user_named_leaf_type_is_not_traced(example_input):
    result = trace(Outer(), leaf_types=[nn.Sequential])
    targets = [node.target for node in result.graph_module.graph.nodes if node.op == "call_module"]

    assert "block" in targets
    assert result.leaves == {}


def test_nodes_record_their_module_path():
    result = trace(Outer(), leaf_types=[DataDependent])
    name_to_path = {
        node.name: node.meta["fxadapt"]["module_path"] for node in result.graph_module.graph.nodes
    }

    assert name_to_path["block_1"] == "block"
    assert name_to_path["add"] == ""


class RootBranches(nn.Module):
    def forward(self, x):
        if x.mean() > 0:
            return x
        return -x


def test_untraceable_root_names_the_line():
    with pytest.raises(TraceError) as raised:
        trace(RootBranches())

    assert "RootBranches.forward" in str(raised.value)
    assert "test_tracing.py" in str(raised.value)
    assert "if x.mean() > 0" in str(raised.value)


class SumOfList(nn.Module):
    def forward(self, x):
        return sum([torch.relu(x), torch.sigmoid(x)])


def test_sum_of_tensors_drops_the_zero_start():
    graph = trace(SumOfList()).graph_module.graph
    adds = [node for node in graph.nodes if node.op == "call_function" and "add" in node.name]

    assert len(adds) == 1
    assert all(isinstance(arg, torch.fx.Node) for arg in adds[0].args)
