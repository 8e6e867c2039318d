"""The mixed edge computes theta_same * o(x) + theta_identity * x and its gradients."""

import pytest
import torch

from fxadapt.mixed import MixedEdge

OPTION_SETS = [
    ("same", "identity", "none"),
    ("same", "identity"),
    ("same", "none"),
    ("identity", "none"),
]


def _edge(options, seed=0):
    generator = torch.Generator().manual_seed(seed)
    edge = MixedEdge(options).double()
    with torch.no_grad():
        for theta in edge.parameters():
            theta.copy_(torch.randn((), generator=generator, dtype=torch.double))
    return edge


def _inputs(memory_format=torch.contiguous_format):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.double)
    out = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.double)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    out = out.contiguous(memory_format=memory_format).requires_grad_()
    return x, out


def _reference(edge, x, out):
    theta_same = getattr(edge, "theta_same", None)
    theta_identity = getattr(edge, "theta_identity", None)
    result = torch.zeros_like(out)
    if theta_same is not None:
        result = result + theta_same * out
    if theta_identity is not None:
        result = result + theta_identity * x
    return result


@pytest.mark.parametrize("options", OPTION_SETS, ids="-".join)
@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
def test_mixed_edge_matches_formula(options, memory_format):
    edge = _edge(options)
    x, out = _inputs(memory_format)
    inputs = [x, out, *edge.parameters()]
    result = edge(x, out)
    expected = _reference(edge, x, out)
    upstream = torch.randn_like(result)

    gradients = torch.autograd.grad(result, inputs, upstream, allow_unused=True)
    expected_gradients = torch.autograd.grad(expected, inputs, upstream, allow_unused=True)

    assert torch.allclose(result, expected)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        if gradient is None:
            # An input the formula multiplies by nothing, such as x of a same-only edge.
            assert expected_gradient is None or not expected_gradient.any()
        else:
            assert torch.allclose(gradient, expected_gradient)


@pytest.mark.parametrize("options", OPTION_SETS, ids="-".join)
def test_mixed_edge_passes_gradcheck(options):
    edge = _edge(options)
    x, out = _inputs()

    assert torch.autograd.gradcheck(lambda x, out: edge(x, out), (x, out))


def test_mixed_edge_without_grad_matches_formula():
    edge = _edge(("same", "identity", "none"))
    x, out = _inputs()

    with torch.no_grad():
        result = edge(x, out)

    assert torch.allclose(result, _reference(edge, x, out).detach())
    assert result.grad_fn is None


def test_frozen_theta_saves_no_activation():
    edge = _edge(("same", "identity", "none"))
    for theta in edge.parameters():
        theta.requires_grad_(False)
    x, out = _inputs()
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = edge(x, out)
    result.sum().backward()

    assert all(size == 1 for size in saved_sizes)
    assert torch.allclose(out.grad, edge.theta_same.expand_as(out))


def test_bfloat16_theta_gradient_is_float32():
    edge = MixedEdge(("same", "none"))
    out = torch.randn(2, 3, 4, 4).bfloat16().requires_grad_()

    result = edge(out, out)
    result.float().sum().backward()

    assert result.dtype == torch.bfloat16
    assert edge.theta_same.grad.dtype == torch.float32
    assert edge.theta_same.grad.item() == pytest.approx(out.float().sum().item(), rel=1e-2)


def test_mixed_edge_traces_into_plain_operations():
    edge = MixedEdge(("same", "identity", "none"))

    traced = torch.fx.symbolic_trace(edge)
    targets = [node.target for node in traced.graph.nodes if node.op != "placeholder"]

    assert "addcmul_" in targets
    assert not any("apply" in str(target) for target in targets)
