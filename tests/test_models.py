"""Tests for the model zoo in `models/`.

The zoo files are loaded by path, as `fxadapt train models/FILE.py:Class` loads them, which also
checks that each file works without the fxadapt package.
"""

import ast
import copy
import importlib.util
import operator
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

# Class name to file name.
ZOO = {
    "ResNet20": "resnet20.py",
    "MobileNetV2": "mobilenetv2.py",
    "DARTS": "darts.py",
    "ProxylessNAS": "proxylessnas.py",
    "ResNet50": "resnet50.py",
}

# Exact parameter counts at 10 classes, as the class docstrings state them.
DOCSTRING_PARAMETERS = {
    "ResNet20": 269_722,
    "MobileNetV2": 2_236_682,
    "DARTS": 3_349_342,
    "ProxylessNAS": 5_408_138,
    "ResNet50": 23_520_842,
}

# Published parameter counts of the CIFAR networks and the relative tolerance of each check.
# ProxylessNAS has no published CIFAR count of this network, so it is checked at 1000 classes.
PUBLISHED_PARAMETERS = {
    "ResNet20": (0.27e6, 0.02),
    "MobileNetV2": (2.2e6, 0.05),
    "DARTS": (3.3e6, 0.05),
    "ResNet50": (23.5e6, 0.02),
}

# Residual adds, or sums of two operations in the DARTS cells (4 per cell, 20 cells).
ADDITIVE_MERGES = {
    "ResNet20": 9,
    "MobileNetV2": 10,
    "DARTS": 80,
    "ProxylessNAS": 7,
    "ResNet50": 16,
}

_ZOO_MODULES = {}
_EVAL_MODELS = {}
_TRACED = {}


def _load_zoo_module(file_name: str):
    if file_name in _ZOO_MODULES:
        return _ZOO_MODULES[file_name]
    module_name = f"fxadapt_zoo_under_test_{Path(file_name).stem}"
    spec = importlib.util.spec_from_file_location(module_name, MODELS_DIR / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    _ZOO_MODULES[file_name] = module
    return module


def _model_class(name: str) -> type[nn.Module]:
    return getattr(_load_zoo_module(ZOO[name]), name)


def _eval_model(name: str) -> nn.Module:
    """Build one default model per class in eval mode, shared by the tests that only read it."""
    if name not in _EVAL_MODELS:
        torch.manual_seed(0)
        _EVAL_MODELS[name] = _model_class(name)().eval()
    return _EVAL_MODELS[name]


def _example_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=generator)


def _traced(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """Trace the eval model and run ShapeProp once; return the graph module and its output."""
    if name not in _TRACED:
        graph_module = torch.fx.symbolic_trace(_eval_model(name))
        with torch.no_grad():
            output = ShapeProp(graph_module).propagate(_example_batch())
        _TRACED[name] = (graph_module, output)
    return _TRACED[name]


def _count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _count_additive_merges(graph_module: torch.fx.GraphModule) -> int:
    """Count add nodes with two tensor inputs. ShapeProp must have run on the graph."""
    count = 0
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target not in (operator.add, operator.iadd, torch.add):
            continue
        inputs = [arg for arg in node.args if isinstance(arg, torch.fx.Node)]
        if len(inputs) == 2 and all("tensor_meta" in arg.meta for arg in inputs):
            count += 1
    return count


def _count_call_modules(graph_module: torch.fx.GraphModule, module_type: type) -> int:
    modules = dict(graph_module.named_modules())
    return sum(
        1
        for node in graph_module.graph.nodes
        if node.op == "call_module" and isinstance(modules[node.target], module_type)
    )


@pytest.mark.parametrize("name", ZOO)
def test_zoo_file_imports_only_torch(name):
    tree = ast.parse((MODELS_DIR / ZOO[name]).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
            assert roots == ["torch"] * len(roots), f"line {node.lineno} imports {roots}"
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"line {node.lineno} is a relative import"
            assert node.module.split(".")[0] == "torch", f"line {node.lineno}: {node.module}"


def test_zoo_package_lists_every_model():
    package_name = "fxadapt_zoo_package_under_test"
    spec = importlib.util.spec_from_file_location(
        package_name, MODELS_DIR / "__init__.py", submodule_search_locations=[str(MODELS_DIR)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[package_name] = package
    spec.loader.exec_module(package)

    assert sorted(package.__all__) == sorted(ZOO)
    for name in ZOO:
        assert issubclass(getattr(package, name), nn.Module)


@pytest.mark.parametrize("name", ZOO)
def test_forward_gives_logits_per_class(name):
    with torch.no_grad():
        logits = _eval_model(name)(_example_batch())

    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ZOO)
def test_num_classes_sets_output_width(name):
    model = _model_class(name)(num_classes=7).eval()

    with torch.no_grad():
        logits = model(_example_batch())

    assert logits.shape == (2, 7)


@pytest.mark.parametrize("name", ZOO)
def test_parameter_count_matches_docstring(name):
    model_class = _model_class(name)

    assert _count_parameters(_eval_model(name)) == DOCSTRING_PARAMETERS[name]
    assert f"{DOCSTRING_PARAMETERS[name]:,}" in model_class.__doc__


@pytest.mark.parametrize("name", PUBLISHED_PARAMETERS)
def test_parameter_count_near_published(name):
    published, tolerance = PUBLISHED_PARAMETERS[name]

    count = _count_parameters(_eval_model(name))

    assert abs(count - published) <= tolerance * published, f"{name}: {count:,}"


@pytest.mark.parametrize("name", ZOO)
def test_traced_output_matches_model(name):
    graph_module, traced_output = _traced(name)

    with torch.no_grad():
        output = _eval_model(name)(_example_batch())

    graph_module.graph.lint()
    assert (traced_output - output).abs().max().item() <= 1e-6


@pytest.mark.parametrize("name", ZOO)
def test_traced_graph_merge_count(name):
    graph_module, _ = _traced(name)

    assert _count_additive_merges(graph_module) == ADDITIVE_MERGES[name]


def test_resnet20_downsampling_shortcuts_have_no_weights():
    module = _load_zoo_module(ZOO["ResNet20"])
    model = _eval_model("ResNet20")

    blocks = [block for block in model.modules() if isinstance(block, module.BasicBlock)]
    shortcuts = [block.downsample for block in blocks if block.downsample is not None]

    assert len(blocks) == 9
    assert len(shortcuts) == 2
    assert all(isinstance(shortcut, module.SubsamplePadShortcut) for shortcut in shortcuts)
    assert sum(_count_parameters(shortcut) for shortcut in shortcuts) == 0


def test_resnet20_shortcut_subsamples_and_pads_zeros():
    module = _load_zoo_module(ZOO["ResNet20"])
    x = torch.randn(2, 16, 8, 8)

    out = module.SubsamplePadShortcut(16, 32)(x)

    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any()
    assert not out[:, 24:].any()


@pytest.mark.parametrize(("depth", "merges"), [(32, 15), (56, 27)])
def test_resnet20_depth_sets_block_count(depth, merges):
    model = _model_class("ResNet20")(depth=depth)

    graph_module = torch.fx.symbolic_trace(model)
    ShapeProp(graph_module).propagate(_example_batch())

    assert _count_additive_merges(graph_module) == merges


def test_resnet20_rejects_invalid_depth():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        _model_class("ResNet20")(depth=21)


def test_mobilenetv2_has_no_projection_shortcuts():
    module = _load_zoo_module(ZOO["MobileNetV2"])
    blocks = [
        m for m in _eval_model("MobileNetV2").modules() if isinstance(m, module.InvertedResidual)
    ]

    assert len(blocks) == 17
    assert sum(block.use_residual for block in blocks) == 10
    for block in blocks:
        assert sorted(name for name, _ in block.named_children()) in (
            ["depthwise", "expand", "project"],
            ["depthwise", "project"],
        )


def test_proxylessnas_blocks_differ():
    module = _load_zoo_module(ZOO["ProxylessNAS"])
    blocks = [m for m in _eval_model("ProxylessNAS").modules() if isinstance(m, module.MBConvBlock)]

    # Read kernel and expansion from the convolutions, not from the recorded attributes.
    kernel_expansion_pairs = set()
    for block in blocks:
        depthwise = block.depthwise[0]
        first_conv = block.expand[0] if block.expand is not None else depthwise
        expansion = depthwise.out_channels // first_conv.in_channels
        kernel_expansion_pairs.add((depthwise.kernel_size[0], expansion))
        assert (block.kernel_size, block.expansion) == (depthwise.kernel_size[0], expansion)

    assert len(blocks) == 14
    assert len(kernel_expansion_pairs) >= 3
    assert {kernel for kernel, _ in kernel_expansion_pairs} == {3, 5, 7}
    assert {expansion for _, expansion in kernel_expansion_pairs} == {1, 3, 6}


def test_proxylessnas_downsamples_eight_times():
    graph_module, _ = _traced("ProxylessNAS")
    pooling = next(node for node in graph_module.graph.nodes if node.target == "avgpool")

    pooled_input = pooling.args[0].meta["tensor_meta"]

    assert tuple(pooled_input.shape) == (2, 1728, 4, 4)


def test_proxylessnas_matches_imagenet_parameter_count():
    # The ImageNet ProxylessNAS-GPU of the imgclsmob (pytorchcv) zoo has 7,119,848 parameters.
    model = _model_class("ProxylessNAS")(num_classes=1000)

    assert _count_parameters(model) == 7_119_848


def test_resnet50_projection_shortcuts_and_features():
    module = _load_zoo_module(ZOO["ResNet50"])
    model = _eval_model("ResNet50")
    blocks = [m for m in model.modules() if isinstance(m, module.Bottleneck)]

    assert len(blocks) == 16
    assert sum(block.downsample is not None for block in blocks) == 4
    assert model.fc.in_features == 2048
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_darts_reduction_cells_at_thirds():
    model = _eval_model("DARTS")

    reduction_indices = [index for index, cell in enumerate(model.cells) if cell.reduction]

    assert reduction_indices == [6, 13]


def test_darts_drop_path_skips_identity_operations():
    graph_module, _ = _traced("DARTS")

    # A normal cell has 2 identity operations of 8, a reduction cell 3.
    assert _count_call_modules(graph_module, nn.Dropout3d) == 18 * 6 + 2 * 5


def test_darts_24_layers_builds_and_traces():
    model = _model_class("DARTS")(C=16, layers=24).eval()

    graph_module = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        logits = ShapeProp(graph_module).propagate(_example_batch())

    assert [index for index, cell in enumerate(model.cells) if cell.reduction] == [8, 16]
    assert logits.shape == (2, 10)
    assert _count_additive_merges(graph_module) == 96


def test_darts_auxiliary_output_only_in_training():
    model = _model_class("DARTS")(C=8, layers=5, auxiliary=True)
    x = _example_batch()

    model.train()
    train_output = model(x)
    model.eval()
    eval_output = model(x)

    assert isinstance(train_output, tuple)
    assert len(train_output) == 2
    assert train_output[0].shape == (2, 10)
    assert train_output[1].shape == (2, 10)
    assert isinstance(eval_output, torch.Tensor)
    assert eval_output.shape == (2, 10)


def test_darts_auxiliary_choice_frozen_by_tracing():
    model = _model_class("DARTS")(C=8, layers=5, auxiliary=True).train()

    graph_module = torch.fx.symbolic_trace(model)
    graph_module.eval()

    assert isinstance(graph_module(_example_batch()), tuple)


def test_drop_path_zeroes_whole_samples_after_tracing():
    module = _load_zoo_module(ZOO["DARTS"])
    graph_module = torch.fx.symbolic_trace(module.DropPath(0.0).eval())
    x = torch.ones(64, 3, 4, 4)

    graph_module.dropout.p = 0.5
    graph_module.train()
    torch.manual_seed(0)
    out = graph_module(x)
    per_sample_values = out.flatten(1)
    dropped = (per_sample_values == 0).all(dim=1)
    kept = (per_sample_values == 2).all(dim=1)

    assert (dropped | kept).all()
    assert dropped.any()
    assert kept.any()

    graph_module.eval()
    assert torch.equal(graph_module(x), x)


def test_traced_darts_reads_drop_path_at_run_time():
    torch.manual_seed(0)
    model = _model_class("DARTS")(C=8, layers=5).eval()
    graph_module = torch.fx.symbolic_trace(model)
    x = _example_batch()

    # Traced in eval mode at p = 0, so only run-time reads can make the graph drop paths.
    graph_module.train()
    with torch.no_grad():
        first = graph_module(x)
        second = graph_module(x)
        model.drop_path_prob = 0.5
        torch.manual_seed(1)
        dropped_a = graph_module(x)
        torch.manual_seed(2)
        dropped_b = graph_module(x)

    assert torch.equal(first, second)
    assert not torch.allclose(dropped_a, first)
    assert not torch.allclose(dropped_a, dropped_b)


def test_traced_darts_eval_mode_skips_drop_path():
    torch.manual_seed(0)
    model = _model_class("DARTS")(C=8, layers=5, drop_path_prob=0.5).train()
    graph_module = torch.fx.symbolic_trace(model)
    x = _example_batch()

    # Traced in training mode at p = 0.5, so the graph must read the eval mode at run time.
    graph_module.eval()
    with torch.no_grad():
        first = graph_module(x)
        second = graph_module(x)
        model.drop_path_prob = 0.0
        without_drop_path = graph_module(x)
        eager = model.eval()(x)

    assert torch.equal(first, second)
    assert torch.equal(first, without_drop_path)
    assert torch.equal(first, eager)


def test_traced_darts_copy_takes_drop_path_on_leaves():
    torch.manual_seed(0)
    model = _model_class("DARTS")(C=8, layers=5)
    graph_module = copy.deepcopy(torch.fx.symbolic_trace(model)).train()
    x = _example_batch()

    with torch.no_grad():
        before = graph_module(x)
        model.drop_path_prob = 0.5
        unchanged = graph_module(x)
        for module in graph_module.modules():
            if isinstance(module, nn.Dropout3d):
                module.p = 0.5
        torch.manual_seed(3)
        dropped = graph_module(x)

    assert torch.equal(before, unchanged)
    assert not torch.allclose(dropped, before)


def test_darts_rejects_drop_path_prob_of_one():
    model = _model_class("DARTS")(C=8, layers=5)

    with pytest.raises(ValueError, match="drop_path_prob"):
        model.drop_path_prob = 1.0
