"""Fold: move constant theta scales into the affine layer that computes the scaled value.

Takes a derived GraphModule and returns a copy in which every ``mul(v, c)`` that ``derive``
added for a theta is removed when ``v`` is the output of a BatchNorm (with affine weights), a
convolution or a linear layer that nothing else uses: that layer's weight and bias are
multiplied by ``c`` instead. Elsewhere the multiply stays. Outputs are unchanged up to
floating-point rounding, in training and in eval mode (BatchNorm's statistics are computed
before its affine step).

Before::

    conv ──▶ bn ──▶ mul(·, 0.8) ──▶ add

After (bn.weight and bn.bias times 0.8)::

    conv ──▶ bn ──▶ add
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

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
    target_to_calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            target_to_calls[node.target] = target_to_calls.get(node.target, 0) + 1

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
    graph.lint()
    result.recompile()
    return result


def _can_fold(graph_module, value: torch.fx.Node, target_to_calls: dict[str, int]) -> bool:
    if value.op != "call_module" or len(value.users) != 1:
        return False
    if target_to_calls.get(value.target) != 1:
        return False
    module = graph_module.get_submodule(value.target)
    if not isinstance(module, _AFFINE_TYPES):
        return False
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine
    return True


@torch.no_grad()
def _scale_affine(module: nn.Module, scale: float) -> None:
    module.weight.mul_(scale)
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(scale)
