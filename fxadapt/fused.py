"""Fused mixed edges: the modules that ``fuse_mixed_edges`` puts in place of mixed edges.

As ``insert`` writes it, a mixed edge scales its operation's output and its input in passes
of their own, and the merge adds the results in another pass. The fused graph computes the
same sum with fewer passes over the activations:

- :class:`ScaledBatchNorm` computes ``theta_same * bn(z)`` by scaling the affine weight and
  bias of the BatchNorm, one value per channel, instead of its output.
- :class:`MixedSum` computes a whole merge, ``sum_k c_k * t_k``, where each coefficient
  ``c_k`` is a constant plus a sum of theta. Each term after the first costs one
  ``addcmul``, and a term whose coefficient is exactly 1 is the starting value for free.

Both read theta from the ``MixedEdge`` modules at every call, so they train the same
parameters as the wrapped module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fxadapt.mixed import MixedEdge, _inner_product, _records_graph

__all__ = ["MixedSum", "ScaledBatchNorm", "Term"]

# BatchNorm classes whose forward ScaledBatchNorm reproduces exactly.
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class ScaledBatchNorm(nn.Module):
    """Computes ``theta_same * norm(x)`` with the scale applied to the affine weight and bias.

    The running statistics are updated as ``norm`` updates them: they are computed before
    the affine step, so the scale does not change them.

    Args:
        norm: an affine ``BatchNorm1d``, ``BatchNorm2d`` or ``BatchNorm3d``.
        mixed: the mixed edge whose ``theta_same`` scales the output. It is not registered
            as a submodule: the fused module registers every mixed edge under
            ``fxadapt_mixed``, as the wrapped module does.
    """

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm, mixed: MixedEdge):
        super().__init__()
        if type(norm) not in NORM_TYPES or not norm.affine:
            raise ValueError(f"expected an affine torch BatchNorm, got {norm}")
        self.norm = norm
        self._mixed = (mixed,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        theta = self._mixed[0].theta_same
        factor = 0.0 if norm.momentum is None else norm.momentum
        if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
            norm.num_batches_tracked.add_(1)
            if norm.momentum is None:
                # A momentum of None averages over every batch seen so far.
                factor = 1.0 / float(norm.num_batches_tracked)
        use_batch_statistics = norm.training or (
            norm.running_mean is None and norm.running_var is None
        )
        track = not norm.training or norm.track_running_stats
        return F.batch_norm(
            x,
            norm.running_mean if track else None,
            norm.running_var if track else None,
            norm.weight * theta,
            norm.bias * theta,
            use_batch_statistics,
            factor,
            norm.eps,
        )


@dataclass(frozen=True)
class Term:
    """One term of a merge: the coefficient of one input of :class:`MixedSum`.

    Attributes:
        constant: the part of the coefficient that is a number.
        thetas: the theta that add to it, as (theta group, option) pairs.
    """

    constant: float
    thetas: tuple[tuple[str, str], ...] = ()

    @property
    def is_one(self) -> bool:
        """Whether the coefficient is exactly 1, with no theta."""
        return not self.thetas and self.constant == 1.0


class MixedSum(nn.Module):
    """Computes ``sum_k c_k * t_k`` over its inputs, each ``c_k`` given by a :class:`Term`.

    The first input whose coefficient is exactly 1 starts the sum without a pass of its own.
    The backward pass scales each input's gradient by its coefficient and forms the theta
    gradients as inner products, so it allocates nothing beyond the input gradients.

    Args:
        terms: one term per input, in input order.
        mixed_edges: theta group name to its mixed edge; kept without registering them.
        in_place: add the other terms into the input that starts the sum, as ``add_`` does,
            instead of into a new tensor. Only for an input with a coefficient of exactly 1
            that nothing else reads and whose own backward pass does not read it, such as
            the output of a BatchNorm layer.
    """

    def __init__(
        self, terms: list[Term], mixed_edges: dict[str, MixedEdge], in_place: bool = False
    ):
        super().__init__()
        if not terms:
            raise ValueError("a mixed sum needs at least one term")
        self.terms = tuple(terms)
        self._mixed_edges = dict(mixed_edges)
        # The input that starts the sum: one with a coefficient of exactly 1 where possible.
        first = next((index for index, term in enumerate(self.terms) if term.is_one), 0)
        self.order = (first, *(index for index in range(len(self.terms)) if index != first))
        if in_place and (len(self.terms) < 2 or not self.terms[first].is_one):
            raise ValueError(
                "invalid in-place sum: it needs two terms or more, one with coefficient 1"
            )
        self.in_place = in_place

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) != len(self.terms):
            raise ValueError(f"expected {len(self.terms)} inputs, got {len(tensors)}")
        arguments = []
        for index in self.order:
            arguments += [tensors[index], self._coefficient(self.terms[index])]
        if _records_graph(tensors[0]):
            return _ScaledSum.apply(self.in_place, *arguments)
        return _scaled_sum(self.in_place, *arguments)

    def _coefficient(self, term: Term) -> torch.Tensor | float | None:
        """Returns the coefficient as a tensor with theta, a number, or None for exactly 1."""
        if not term.thetas:
            return None if term.constant == 1.0 else term.constant
        total = None
        for group, option in term.thetas:
            theta = getattr(self._mixed_edges[group], f"theta_{option}")
            total = theta if total is None else total + theta
        return total + term.constant if term.constant else total

    def extra_repr(self) -> str:
        parts = []
        for term in self.terms:
            names = [f"theta_{option}[{group}]" for group, option in term.thetas]
            if term.constant or not names:
                names.append(f"{term.constant:g}")
            parts.append(" + ".join(names))
        text = ", ".join(f"({part})" for part in parts)
        return f"{text}, in_place=True" if self.in_place else text


def _scaled_sum(in_place: bool, *arguments):
    """Returns ``sum_k c_k * t_k`` for arguments ``t_0, c_0, t_1, c_1, ...``.

    A coefficient is a tensor, a number, or None for exactly 1. The first operation makes
    the new tensor, and the others add into it in place. With ``in_place`` the first
    tensor, whose coefficient is 1, is the result.
    """
    first, coefficient = arguments[0], arguments[1]
    if in_place:
        result = first
    else:
        result = None if coefficient is None else first * coefficient
    for index in range(2, len(arguments), 2):
        tensor, coefficient = arguments[index], arguments[index + 1]
        if result is None:
            result = _add(first, tensor, coefficient)
        elif coefficient is None:
            result.add_(tensor)
        elif isinstance(coefficient, torch.Tensor):
            result.addcmul_(tensor, coefficient)
        else:
            result.add_(tensor, alpha=coefficient)
    # A single term with a coefficient of 1 is its input itself: return a copy, as an add
    # would, so that in-place operations after the merge do not write into the input.
    return first.clone() if result is None else result


def _add(first, tensor, coefficient):
    if coefficient is None:
        return torch.add(first, tensor)
    if isinstance(coefficient, torch.Tensor):
        return torch.addcmul(first, tensor, coefficient)
    return torch.add(first, tensor, alpha=coefficient)


class _ScaledSum(torch.autograd.Function):
    """``_scaled_sum`` with a backward pass that saves only what it needs.

    The gradient of a coefficient that is a tensor is the inner product of the output
    gradient with its input, so the input is saved only when that coefficient requires a
    gradient. The gradient of an input is the output gradient times its coefficient, and
    the output gradient itself where the coefficient is 1.
    """

    @staticmethod
    def forward(ctx, in_place, *arguments):
        tensors = arguments[0::2]
        coefficients = arguments[1::2]
        ctx.coefficients = [
            None if isinstance(coefficient, torch.Tensor) else coefficient
            for coefficient in coefficients
        ]
        saved = []
        for index, (tensor, coefficient) in enumerate(zip(tensors, coefficients, strict=True)):
            # needs_input_grad starts with the in_place flag.
            needs_tensor_grad = ctx.needs_input_grad[1 + 2 * index]
            needs_coefficient_grad = ctx.needs_input_grad[2 + 2 * index]
            saved.append(tensor if needs_coefficient_grad else None)
            saved.append(
                coefficient if isinstance(coefficient, torch.Tensor) and needs_tensor_grad else None
            )
        ctx.save_for_backward(*saved)
        if in_place:
            ctx.mark_dirty(tensors[0])
        return _scaled_sum(in_place, *arguments)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        gradients = [None]
        for index, number in enumerate(ctx.coefficients):
            tensor, coefficient = saved[2 * index], saved[2 * index + 1]
            if not ctx.needs_input_grad[1 + 2 * index]:
                gradients.append(None)
            elif coefficient is not None:
                gradients.append(grad * coefficient)
            elif number is None:
                gradients.append(grad)
            else:
                gradients.append(grad * number)
            if ctx.needs_input_grad[2 + 2 * index]:
                gradients.append(_inner_product(grad, tensor).reshape(()))
            else:
                gradients.append(None)
        return tuple(gradients)
