"""The mixed edge: the module that weights an edge's options by theta."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torch.autograd.function import once_differentiable
from torch.compiler import is_compiling

from fxadapt.edges import OPTIONS

__all__ = ["MixedEdge", "THETA_INIT"]

# theta at the start of training: the wrapped network computes what the original computes.
THETA_INIT = {"same": 1.0, "identity": 0.0, "none": 0.0}


class MixedEdge(nn.Module):
    """Computes ``theta_none * 0 + theta_identity * x + theta_same * o(x)`` for one edge.

    The module receives the edge's input ``x`` and the output of its original operation
    ``o(x)``; the operation itself stays in the graph. theta are raw scalars, without a
    softmax. ``theta_none`` multiplies zero, so it never gets a gradient: it is a buffer, a
    constant 0, kept so that decisions can compare it with the other options. An option the
    edge does not admit has no theta and costs nothing in the forward.

    A new shortcut's original operation is none: it admits identity and none only, and
    starts as an exact zero.

    Args:
        options: the options the edge admits, a subset of ``("same", "identity", "none")``
            with at least two options, or ``same`` alone.
    """

    def __init__(self, options: tuple[str, ...] | list[str]):
        super().__init__()
        unknown = set(options) - set(OPTIONS)
        if unknown or not options or ("same" not in options and len(set(options)) < 2):
            raise ValueError(f"options must be two or more of {OPTIONS}, got {options}")
        self.options = tuple(option for option in OPTIONS if option in options)
        self.has_same = "same" in self.options
        if self.has_same:
            self.theta_same = nn.Parameter(torch.tensor(THETA_INIT["same"]))
        self.has_identity = "identity" in self.options
        if self.has_identity:
            self.theta_identity = nn.Parameter(torch.tensor(THETA_INIT["identity"]))
        if "none" in self.options:
            self.register_buffer("theta_none", torch.tensor(THETA_INIT["none"]))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.has_same:
            return x * self.theta_identity
        identity = x if self.has_identity else None
        theta_identity = self.theta_identity if self.has_identity else None
        if _records_graph(out):
            return _WeightedSum.apply(out, self.theta_same, identity, theta_identity)
        result = out * self.theta_same
        if identity is not None:
            result.addcmul_(identity, theta_identity)
        return result

    def theta(self) -> dict[str, float]:
        """Returns the current theta of every admitted option."""
        return {option: float(getattr(self, f"theta_{option}").detach()) for option in self.options}

    def extra_repr(self) -> str:
        return ", ".join(f"{option}={value:.4g}" for option, value in self.theta().items())


def _records_graph(value) -> bool:
    """Returns True when the forward runs eagerly with autograd recording a graph."""
    if not torch.is_grad_enabled() or isinstance(value, torch.fx.Proxy):
        return False
    return not (torch.jit.is_scripting() or torch.jit.is_tracing() or is_compiling())


class _WeightedSum(torch.autograd.Function):
    """Computes ``theta_same * out + theta_identity * x`` with one new tensor.

    The default autograd formulas of ``out * theta_same`` and ``addcmul`` allocate a tensor
    per operation and save ``out`` for the gradient of theta even when theta needs none.
    Here the forward scales ``out`` into a new tensor and adds ``theta_identity * x`` to it
    in place, one fused multiply-add per element. The backward forms a theta gradient as an
    inner product, which allocates nothing, and saves ``out`` or ``x`` only when the theta
    that multiplies it requires a gradient. ``x`` and ``theta_identity`` are None for an edge
    without the identity option.
    """

    @staticmethod
    def forward(ctx, out, theta_same, x, theta_identity):
        result = out * theta_same
        if x is not None:
            result.addcmul_(x, theta_identity)
        needs_same_grad = ctx.needs_input_grad[1]
        needs_identity_grad = ctx.needs_input_grad[3]
        ctx.save_for_backward(
            out if needs_same_grad else None,
            theta_same,
            x if needs_identity_grad else None,
            theta_identity,
        )
        return result

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, theta_same, x, theta_identity = ctx.saved_tensors
        needs_out_grad, needs_same_grad, needs_x_grad, needs_identity_grad = ctx.needs_input_grad
        grad_out = grad * theta_same if needs_out_grad else None
        grad_same = _inner_product(grad, out) if needs_same_grad else None
        grad_x = grad * theta_identity if needs_x_grad else None
        grad_identity = _inner_product(grad, x) if needs_identity_grad else None
        return grad_out, grad_same, grad_x, grad_identity


def _inner_product(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Returns the sum of the elementwise product of two tensors of the same shape.

    Half-precision products are summed in float32.
    """
    dtype = torch.promote_types(first.dtype, second.dtype)
    if first.dtype != second.dtype or dtype in (torch.float16, torch.bfloat16):
        return (first * second).sum(dtype=torch.promote_types(dtype, torch.float32))
    if first.is_contiguous() and second.is_contiguous():
        return torch.dot(first.view(-1), second.view(-1))
    if first.dim() == 4 and all(
        tensor.is_contiguous(memory_format=torch.channels_last) for tensor in (first, second)
    ):
        # The NHWC order of a channels-last tensor is its memory order, so these are views.
        first_flat = first.permute(0, 2, 3, 1).reshape(-1)
        second_flat = second.permute(0, 2, 3, 1).reshape(-1)
        return torch.dot(first_flat, second_flat)
    return (first * second).sum()
