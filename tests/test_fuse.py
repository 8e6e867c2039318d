"""The fused module computes what the wrapped module computes, with the same parameters."""

import copy

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.fused import MixedSum, Term
from fxadapt.mixed import MixedEdge
from fxadapt.models import DARTS, MobileNetV2, ProxylessNAS, ResNet20

from conftest import randomize_batchnorm

NETWORKS = {
    "ResNet20": lambda: ResNet20(depth=8),
    "MobileNetV2": lambda: MobileNetV2(),
    "DARTS": lambda: DARTS(C=8, layers=6),
    "ProxylessNAS": lambda: ProxylessNAS(),
}

WRAP_OPTIONS = {
    "branch": {},
    "layer": {"granularity": "layer"},
    "shortcuts": {"shortcuts": True},
    "cell": {"scope": "cell"},
}


def _random_theta(wrapped, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for theta in fxadapt.arch_parameters(wrapped):
            theta.copy_(torch.rand((), generator=generator) * 1.5 - 0.25)


def _mixed_calls(module) -> list[str]:
    return [
        node.target
        for node in module.graph.nodes
        if node.op == "call_module" and node.target.startswith("fxadapt_mixed.")
    ]


def _pair(name: str, options: dict, seed: int = 0, dtype=torch.float32):
    """Returns a wrapped module with random theta, an equal copy and the copy's fused module."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(NETWORKS[name](), seed)
    wrapped = fxadapt.wrap(model, torch.randn(2, 3, 32, 32), **options).to(dtype)
    _random_theta(wrapped, seed)
    twin = copy.deepcopy(wrapped)
    return wrapped, twin, fxadapt.fuse(twin)


def _assert_close_relative(actual, expected, name, tolerance=1e-4, floor=0.0):
    """Asserts that the largest difference is within ``tolerance`` of the largest value.

    ``floor`` is an absolute allowance for values that are zero up to rounding, such as the
    gradient of a bias that a BatchNorm in training mode follows.
    """
    scale = float(expected.detach().abs().max()) or 1.0
    difference = float((actual - expected).detach().abs().max())
    allowed = tolerance * scale + floor
    assert difference <= allowed, f"{name}: {difference} against a scale of {scale}"


# In float64, so that the rounding differences of float32, which the BatchNorm layers of a
# deep network amplify in the gradients of its first layers, do not hide a wrong formula.
@pytest.mark.parametrize("options", list(WRAP_OPTIONS))
@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_training_step_matches_wrapped(name, options):
    wrapped, twin, fused = _pair(name, WRAP_OPTIONS[options], dtype=torch.float64)
    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    wrapped.train()
    fused.train()

    torch.manual_seed(1)
    expected = wrapped(images)
    torch.manual_seed(1)
    actual = fused(images)
    expected = expected[0] if isinstance(expected, tuple) else expected
    actual = actual[0] if isinstance(actual, tuple) else actual
    _assert_close_relative(actual, expected, "output", 1e-9)

    expected.square().mean().backward()
    actual.square().mean().backward()
    largest = max(float(p.grad.abs().max()) for p in wrapped.parameters() if p.grad is not None)
    for (parameter_name, parameter), twin_parameter in zip(
        wrapped.named_parameters(), twin.parameters(), strict=True
    ):
        if parameter.grad is None:
            assert twin_parameter.grad is None, parameter_name
            continue
        _assert_close_relative(
            twin_parameter.grad, parameter.grad, parameter_name, 1e-7, floor=1e-9 * largest
        )
    for (buffer_name, buffer), twin_buffer in zip(
        wrapped.named_buffers(), twin.buffers(), strict=True
    ):
        if buffer.dtype.is_floating_point:
            _assert_close_relative(twin_buffer, buffer, buffer_name, 1e-9)
        else:
            assert torch.equal(twin_buffer, buffer), buffer_name


@pytest.mark.parametrize("name", list(NETWORKS))
def test_fused_eval_matches_wrapped(name):
    wrapped, _, fused = _pair(name, {}, seed=2)
    images = torch.randn(4, 3, 32, 32)

    with torch.no_grad():
        expected = wrapped.eval()(images)
        actual = fused.eval()(images)

    _assert_close_relative(actual, expected, "output")


def test_resnet_merges_become_one_sum_each():
    wrapped, _, fused = _pair("ResNet20", {})
    targets = [node.target for node in fused.graph.nodes if node.op == "call_module"]
    edges = fxadapt.edge_table(wrapped).edges

    assert _mixed_calls(fused) == []
    # ResNet8: three blocks, each with a residual branch ending in BatchNorm and a shortcut.
    assert len(edges) == 6
    assert sum(target.startswith("fxadapt_fused.sum_") for target in targets) == 3
    assert sum(target.startswith("fxadapt_fused.norm_") for target in targets) == 3
    assert not any(target.endswith(".bn2") for target in targets)


def test_fused_relus_work_in_place():
    wrapped, twin, fused = _pair("ResNet20", {})
    functions = [node.target for node in fused.graph.nodes if node.op == "call_function"]
    relu_modules = [
        node.target
        for node in twin.graph.nodes
        if node.op == "call_module" and isinstance(twin.get_submodule(node.target), nn.ReLU)
    ]

    # ResNet8 has a stem ReLU and two per block, each after a BatchNorm or a fused sum.
    assert functions.count(torch.relu_) == 7
    assert torch.relu not in functions
    # The wrapped module, which derivation and checkpoints read, keeps its ReLU modules.
    assert len(relu_modules) == 7
    assert all(isinstance(twin.get_submodule(target), nn.ReLU) for target in relu_modules)


def test_fused_shares_parameters_and_theta():
    wrapped, twin, fused = _pair("ResNet20", {})
    twin_parameters = {id(parameter) for parameter in twin.parameters()}
    fused_parameters = {id(parameter) for parameter in fused.parameters()}
    fused_thetas = {id(theta) for theta in fxadapt.arch_parameters(fused)}

    assert fused_parameters == twin_parameters
    assert fused_thetas == {id(theta) for theta in fxadapt.arch_parameters(twin)}


def test_theta_change_reaches_fused():
    _, twin, fused = _pair("ResNet20", {})
    images = torch.randn(2, 3, 32, 32)
    fused.eval()
    twin.eval()
    with torch.no_grad():
        for theta in fxadapt.arch_parameters(twin):
            theta.mul_(-0.5)
        expected = twin(images)
        actual = fused(images)

    _assert_close_relative(actual, expected, "output")


def test_fused_module_cannot_be_derived_or_fused():
    _, _, fused = _pair("ResNet20", {})

    with pytest.raises(TypeError, match="derive the module from fxadapt.wrap"):
        fxadapt.derive(fused)
    with pytest.raises(TypeError, match="fused already"):
        fxadapt.fuse(fused)


def test_edge_not_ending_in_batchnorm_stays_mixed():
    wrapped, _, fused = _pair("ResNet20", {"granularity": "layer"})
    edges = fxadapt.edge_table(wrapped).edges
    unfused_targets = [f"fxadapt_mixed.{edge.theta}" for edge in edges if not edge.consumer]

    # The layer edges that no add reads end in ReLU, so neither rewrite applies to them.
    assert [edge.ops[-1] for edge in edges if not edge.consumer] == ["ReLU"]
    assert _mixed_calls(fused) == unfused_targets


def _double_edges() -> dict[str, MixedEdge]:
    """Returns two float64 mixed edges, "a" with three options and "b" with two, theta set."""
    edges = {"a": MixedEdge(("same", "identity", "none")), "b": MixedEdge(("same", "none"))}
    edges = {name: edge.double() for name, edge in edges.items()}
    with torch.no_grad():
        edges["a"].theta_identity.fill_(0.3)
        edges["b"].theta_same.fill_(-0.7)
    return edges


def test_mixed_sum_gradients_match_finite_differences():
    edges = _double_edges()
    terms = [
        Term(1.0),
        Term(0.0, (("a", "identity"), ("b", "same"))),
        Term(0.5, (("a", "same"),)),
        Term(2.0),
    ]
    mixed_sum = MixedSum(terms, edges)
    tensors = [torch.randn(2, 3, dtype=torch.double, requires_grad=True) for _ in terms]
    thetas = [edges["a"].theta_same, edges["a"].theta_identity, edges["b"].theta_same]

    def function(*inputs):
        return mixed_sum(*inputs[: len(terms)])

    assert torch.autograd.gradcheck(function, (*tensors, *thetas))


def test_mixed_sum_computes_weighted_sum():
    edges = {"a": MixedEdge(("same", "identity"))}
    with torch.no_grad():
        edges["a"].theta_same.fill_(0.25)
        edges["a"].theta_identity.fill_(-2.0)
    first, second, third = torch.randn(3, 5, 4).unbind()
    mixed_sum = MixedSum([Term(0.0, (("a", "same"),)), Term(1.0), Term(3.0)], edges)
    expected = 0.25 * first + second + 3.0 * third

    with torch.no_grad():
        assert torch.allclose(mixed_sum(first, second, third), expected)
    assert torch.allclose(mixed_sum(first, second, third), expected)


def test_single_term_sum_copies_its_input():
    mixed_sum = MixedSum([Term(1.0)], {})
    value = torch.randn(3)

    result = mixed_sum(value)

    assert torch.equal(result, value)
    assert result.data_ptr() != value.data_ptr()


def test_scaled_norm_rejects_other_layers():
    from fxadapt.fused import ScaledBatchNorm

    with pytest.raises(ValueError, match="affine torch BatchNorm"):
        ScaledBatchNorm(nn.BatchNorm2d(3, affine=False), MixedEdge(("same", "none")))


def test_in_place_sum_passes_gradcheck():
    edges = _double_edges()
    terms = [Term(0.0, (("a", "identity"), ("b", "same"))), Term(1.0), Term(0.5, (("a", "same"),))]
    mixed_sum = MixedSum(terms, edges, in_place=True)
    tensors = [torch.randn(2, 3, dtype=torch.double, requires_grad=True) for _ in terms]
    thetas = [edges["a"].theta_same, edges["a"].theta_identity, edges["b"].theta_same]

    def function(*inputs):
        first, second, third = inputs[: len(terms)]
        # The sum writes into its second input, so it must not be a leaf.
        return mixed_sum(first, second * 1.0, third)

    assert torch.autograd.gradcheck(function, (*tensors, *thetas))


def test_in_place_sum_writes_into_its_input():
    edges = {"a": MixedEdge(("same", "identity"))}
    with torch.no_grad():
        edges["a"].theta_identity.fill_(-2.0)
    first = torch.randn(5, 4)
    second = torch.randn(5, 4)
    expected = first + -2.0 * second
    mixed_sum = MixedSum([Term(1.0), Term(0.0, (("a", "identity"),))], edges, in_place=True)

    result = mixed_sum(first, second)

    assert result.data_ptr() == first.data_ptr()
    assert torch.allclose(result, expected)


def test_in_place_sum_needs_a_term_of_one():
    edges = {"a": MixedEdge(("same", "identity"))}

    with pytest.raises(ValueError, match="one with coefficient 1"):
        MixedSum([Term(0.0, (("a", "same"),)), Term(2.0)], edges, in_place=True)
    with pytest.raises(ValueError, match="two terms or more"):
        MixedSum([Term(1.0)], edges, in_place=True)
