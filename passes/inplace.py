"""In place: let the ReLUs and residual adds of a module write into their input.

``use_inplace_operations`` takes a derived GraphModule and returns a copy in which

- a ``nn.ReLU`` module call becomes ``torch.relu_`` where its input is a new tensor that
  nothing else reads, and ``torch.relu`` elsewhere;
- an add whose first operand is the output of a BatchNorm layer that nothing else reads
  becomes ``add_`` into that output.

``rewrite_inplace`` makes the same changes to the graph of a fused module itself, because
that module shares its submodules with the wrapped module and must not be copied.

Both changes allocate one tensor less per call, which is what a network written by hand with
``nn.ReLU(inplace=True)`` and ``out += shortcut`` does. Autograd allows both: neither the
BatchNorm backward nor the add backward reads the output they overwrite, and a ReLU that
works in place keeps its output for its backward. The function call also costs less Python
than a module call, which shows at batch 1. Outputs are unchanged bit for bit.

Before::

    bn2 ──▶ add(·, shortcut) ──▶ relu2 (module)

After::

    bn2 ──▶ add_(·, shortcut) ──▶ torch.relu_
"""

from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.fx
from torch import nn

from fxadapt.fused import MixedSum, ScaledBatchNorm
from fxadapt.passes.nodes import module_call_counts, tensor_type

__all__ = ["rewrite_inplace", "use_inplace_operations"]

logger = logging.getLogger(__name__)

# Modules whose output is a new tensor, so an operation after them may write into it.
_NEW_TENSOR_MODULES = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.conv._ConvNd,
    nn.Linear,
    MixedSum,
    ScaledBatchNorm,
)
# Functions and methods whose output is a new tensor (never a view of an input).
_NEW_TENSOR_FUNCTIONS = {operator.add, torch.add, torch.relu, torch.relu_}
_NEW_TENSOR_METHODS = {"add", "add_", "relu", "relu_"}


def use_inplace_operations(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Returns a copy of ``graph_module`` whose ReLUs and residual adds work in place.

    Args:
        graph_module: a derived GraphModule. It is not changed.

    Returns:
        The new GraphModule.
    """
    result = copy.deepcopy(graph_module)
    rewrite_inplace(result)
    result.delete_all_unused_submodules()
    result.recompile()
    return result


def rewrite_inplace(graph_module: torch.fx.GraphModule) -> None:
    """Changes the graph of ``graph_module`` itself as ``use_inplace_operations`` does.

    Submodules are not deleted, even the ReLU modules that no node calls any more, because
    another module may share them. Call ``recompile`` afterwards.
    """
    graph = graph_module.graph
    target_to_calls = module_call_counts(graph)
    adds = relus = 0
    for node in list(graph.nodes):
        if _add_into_batchnorm(graph_module, node, target_to_calls):
            adds += 1
        elif node.op == "call_module" and type(graph_module.get_submodule(node.target)) is nn.ReLU:
            source = node.args[0]
            in_place = len(source.users) == 1 and _is_new_tensor(graph_module, source)
            node.op = "call_function"
            node.target = torch.relu_ if in_place else torch.relu
            relus += in_place
    graph.lint()
    logger.debug("%d adds and %d ReLUs work in place", adds, relus)


def _add_into_batchnorm(graph_module, node: torch.fx.Node, target_to_calls) -> bool:
    """Rewrites ``add(bn, other)`` into ``bn.add_(other)``; returns False where it may not."""
    if node.op != "call_function" or node.target not in (operator.add, torch.add):
        return False
    if len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
        return False
    first, other = node.args
    if not isinstance(first, torch.fx.Node) or len(first.users) != 1:
        return False
    if first.op != "call_module" or target_to_calls.get(first.target) != 1:
        return False
    if not isinstance(graph_module.get_submodule(first.target), nn.modules.batchnorm._BatchNorm):
        return False
    # Only an operand of the sum's own shape and type can take the sum.
    if tensor_type(first) is None or tensor_type(first) != tensor_type(node):
        return False
    node.op, node.target = "call_method", "add_"
    return True


def _is_new_tensor(graph_module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _NEW_TENSOR_MODULES)
    if node.op == "call_function":
        return node.target in _NEW_TENSOR_FUNCTIONS
    return node.op == "call_method" and node.target in _NEW_TENSOR_METHODS
