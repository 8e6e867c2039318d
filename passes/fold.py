"""Fold: move constant theta scales into the affine layer or the merge that takes them.

Takes a derived GraphModule and returns a copy in which every ``mul(v, c)`` that ``derive``
added for a theta is removed when ``v`` is the output of a BatchNorm (with affine weights), a
convolution or a linear layer that nothing else uses. That layer's weight and bias are
multiplied by ``c`` instead. Outputs are unchanged up to floating-point rounding, in training
and in eval mode (BatchNorm's statistics are computed before its affine step).

Before::

    conv ──▶ bn ──▶ mul(·, 0.8) ──▶ add

After (bn.weight and bn.bias times 0.8)::

    conv ──▶ bn ──▶ add

A scale that no layer takes (an empty shortcut, or an identity decision) moves into the add
that it feeds, when that add is its only user and has two tensor operands and no ``alpha``:
``add(a, mul(v, c))`` becomes ``torch.add(a, v, alpha=c)``, one kernel instead of two. An
in-place add keeps writing into the tensor it wrote into before. Elsewhere the multiply stays.

Before::

    x ──▶ mul(·, 0.8) ──▶ add(bn2, ·)

After::

    x ──▶ add(bn2, x, alpha=0.8)
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from fxadapt.passes.nodes import IN_PLACE_ADDS, add_operands, module_call_counts
from fxadapt.tracing import node_info

__all__ = ["THETA_SCALE", "fold_theta_scales"]

logger = logging.getLogger(__name__)

# Key in node.meta["fxadapt"] that marks a multiply by a theta.
THETA_SCALE = "theta_scale"

_AFFINE_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd, nn.Linear)


def fold_theta_scales(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Returns a copy of ``graph_module`` with theta scales folded into affine layers.

    Args:
        graph_module: a derived GraphModule. It is not changed.

    Returns:
        The new GraphModule.
    """
    result = copy.deepcopy(graph_module)
    graph = result.graph
    target_to_calls = module_call_counts(graph)

    folded = 0
    for node in list(graph.nodes):
        if not node_info(node).get(THETA_SCALE):
            continue
        value, scale = node.args
        if _can_fold(result, value, target_to_calls):
            _scale_affine(result.get_submodule(value.target), scale)
            node.replace_all_uses_with(value)
            graph.erase_node(node)
            folded += 1
    logger.debug("folded %d theta scales into affine layers", folded)

    # A second loop, so that a merge whose two inputs are both scaled takes into its alpha
    # only a scale that no affine layer took.
    folded_into_merges = 0
    for node in list(graph.nodes):
        if node_info(node).get(THETA_SCALE) and _fold_into_merge(node):
            graph.erase_node(node)
            folded_into_merges += 1
    logger.debug("folded %d theta scales into the alpha of an add", folded_into_merges)
    graph.lint()
    result.recompile()
    return result


def _can_fold(graph_module, value: torch.fx.Node, target_to_calls: dict[str, int]) -> bool:
    if value.op != "call_module" or len(value.users) != 1:
        return False
    if target_to_calls.get(value.target) != 1:
        return False
    module = graph_module.get_submodule(value.target)
    if not isinstance(module, _AFFINE_TYPES) or not _runs_torch_forward(module):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine
    return True


def _runs_torch_forward(module: nn.Module) -> bool:
    """Returns True when the layer computes with the code that torch.nn defines for it.

    A subclass may add a step after the affine one (timm's ``BatchNormAct2d`` applies an
    activation) or change the weights before using them (weight standardisation), and then a
    scale folded into its weights no longer scales its output.
    """
    for method in ("forward", "_conv_forward"):
        function = getattr(type(module), method, None)
        if function is not None and not function.__module__.startswith("torch.nn."):
            return False
    return True


def _fold_into_merge(scaled: torch.fx.Node) -> bool:
    """Rewrites the add that uses ``scaled = mul(v, c)`` into ``add(other, v, alpha=c)``.

    Returns False, changing nothing, where the add does not qualify; see the module docstring.
    """
    # NOTE: the alpha costs nothing in the forward pass, but the backward pass still scales
    # the gradient of ``v`` in a kernel of its own. Removing that too would mean carrying the
    # scale through the ReLU after the merge into the BatchNorm layers that read it (their eps
    # and running statistics), which this pass does not do.
    if len(scaled.users) != 1:
        return False
    merge = next(iter(scaled.users))
    operands = add_operands(merge)
    if operands is None or operands.count(scaled) != 1:
        return False
    value, scale = scaled.args
    position = operands.index(scaled)
    other = operands[1 - position]
    if _shape(other) is None or _shape(other) != _shape(merge):
        # Only a tensor of the sum's own shape may become the first operand of torch.add.
        return False
    in_place = merge.target in IN_PLACE_ADDS
    if in_place and position == 1:
        # ``other += c * v`` must still write into ``other``, which later nodes may read.
        merge.op, merge.target = "call_method", "add_"
    else:
        # Only this add reads the scaled tensor, so no other node can tell whether it was written.
        merge.op, merge.target = "call_function", torch.add
    merge.args = (other, value)
    merge.kwargs = {"alpha": scale}
    return True


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    tensor_meta = node.meta.get("tensor_meta")
    return tuple(tensor_meta.shape) if hasattr(tensor_meta, "shape") else None


@torch.no_grad()
def _scale_affine(module: nn.Module, scale: float) -> None:
    module.weight.mul_(scale)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(scale)
