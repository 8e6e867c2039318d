"""Small questions that several passes ask of graph nodes."""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx

__all__ = ["IN_PLACE_ADDS", "add_operands", "module_call_counts", "tensor_type"]

# Add targets that write into their first operand.
IN_PLACE_ADDS = (operator.iadd, "add_")


def add_operands(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """Returns the two tensor operands of an add without ``alpha``, or None for any other node.

    In-place adds count too; compare ``node.target`` with ``IN_PLACE_ADDS`` to tell them.
    """
    if node.op == "call_function":
        is_add = node.target in (operator.add, operator.iadd, torch.add)
    else:
        is_add = node.op == "call_method" and node.target in ("add", "add_")
    if not is_add or set(node.kwargs) - {"other"}:
        return None
    operands = [*node.args, *node.kwargs.values()]
    if len(operands) != 2 or not all(isinstance(operand, torch.fx.Node) for operand in operands):
        return None
    return operands


def module_call_counts(graph: torch.fx.Graph) -> Counter:
    """Returns how many ``call_module`` nodes of ``graph`` call each module path."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")


def tensor_type(node: torch.fx.Node) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Returns the shape and dtype that shape propagation recorded, or None without them."""
    tensor_meta = node.meta.get("tensor_meta")
    if not hasattr(tensor_meta, "shape"):
        return None
    return tuple(tensor_meta.shape), tensor_meta.dtype
