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


class TrainingDropout(nn.Module):
    """Drops values in training mode through a function call, as stochastic depth does."""

    def forward(self, x):
        return nn.functional.dropout(x, 0.5, self.training)


class DropoutBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.drop = TrainingDropout()

    def forward(self, x):
        return x + self.drop(self.conv(x))


def test_training_argument_follows_mode(example_input):
    model = DropoutBlock().train()
    result = trace(model)
    graph_module = result.graph_module
    reads = [node for node in graph_module.graph.nodes if node.target == "training"]
    eval_output = graph_module.eval()(example_input)
    training_output = graph_module.train()(example_input)

    assert result.leaves == {}
    assert len(reads) == 1
    assert torch.equal(eval_output, model.eval()(example_input))
    assert not torch.equal(training_output, eval_output)


class HeadDropout(nn.Module):
    """Calls dropout with its training flag in the root's own forward, as classifier heads do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return nn.functional.dropout(self.conv(x), 0.5, self.training)


def test_root_training_argument_follows_mode(example_input, caplog):
    model = HeadDropout().train()
    graph_module = trace(model).graph_module.eval()

    assert torch.equal(graph_module(example_input), model.eval()(example_input))
    assert "training mode" not in caplog.text


class HalveInTraining(nn.Module):
    def forward(self, x):
        if self.training:
            return x * 0.5
        return x


def test_branch_on_mode_makes_leaf(example_input):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), HalveInTraining()).train()
    result = trace(model)
    graph_module = result.graph_module

    assert list(result.leaves) == ["1"]
    assert "branches on the training mode" in result.leaves["1"]
    assert torch.equal(graph_module.eval()(example_input), model.eval()(example_input))
    assert torch.equal(graph_module.train()(example_input), model.train()(example_input))


def test_trace_keeps_every_module_mode():
    model = DropoutBlock().train()
    model.conv.eval()
    trace(model)

    assert model.training
    assert model.drop.training
    assert not model.conv.training


class Scale(nn.Module):
    def forward(self, x):
        return x * 2


class ScaleInTraining(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = Scale()

    def forward(self, x):
        if self.training:
            x = self.scale(x)
        return x


def test_module_called_in_one_mode_blames_caller(example_input):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), ScaleInTraining()).train()
    result = trace(model)

    assert list(result.leaves) == ["1"]
    assert torch.equal(result.graph_module.eval()(example_input), model.eval()(example_input))


class AuxiliaryHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 3, 1)
        self.aux = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        out = self.body(x)
        if self.training:
            return out, self.aux(x)
        return out


def test_mode_dependent_root_keeps_traced_mode(example_input, caplog):
    result = trace(AuxiliaryHead().train())
    output = result.graph_module.eval()(example_input)

    assert result.leaves == {}
    assert isinstance(output, tuple)
    assert "AuxiliaryHead.forward branches on the training mode" in caplog.text


class OptionalMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x, mask=None, scale=1.0):
        x = self.conv(x) * scale
        if mask is not None:
            x = x * mask
        return x


def test_optional_inputs_take_defaults(example_input):
    model = OptionalMask().eval()
    graph_module = trace(model).graph_module
    placeholders = [node.target for node in graph_module.graph.nodes if node.op == "placeholder"]

    assert placeholders == ["x"]
    assert torch.equal(graph_module(example_input), model(example_input))


class TensorOrDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]):
        return self.conv(x)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:The TorchScript type system")
def test_input_annotation_becomes_tensor(example_input):
    graph_module = trace(TensorOrDict()).graph_module
    placeholder = next(node for node in graph_module.graph.nodes if node.op == "placeholder")
    scripted = torch.jit.script(graph_module)

    assert placeholder.type is torch.Tensor
    assert torch.equal(scripted(example_input), graph_module(example_input))


def test_timm_notrace_function_is_one_node():
    timm = pytest.importorskip("timm", reason="timm comes with the dev extra")
    model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).eval()
    graph_module = trace(model).graph_module
    example = torch.randn(2, 3, 32, 32)
    targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]

    assert timm.layers.resample_abs_pos_embed in targets
    assert torch.equal(graph_module(example), model(example))
