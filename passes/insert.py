"""Insert: turn every adaptable edge into a mixed edge.

Takes a traced GraphModule with its edge table and returns a copy in which the value each edge
hands to its merge passes through a ``MixedEdge`` module first. The edge's operation stays in
the graph. Edges that share a theta (cell scope) call the same module. At initialisation the
new module computes exactly what the original computes, because theta starts at
(none, identity, same) = (0, 0, 1).

Before, for a residual branch ``o`` that starts at NAS node ``x``::

    x ──o──▶ out ──▶ add(out, shortcut)

After::

    x ──o──▶ out ──▶ fxadapt_mixed.e0(x, out) ──▶ add(mixed, shortcut)
    └──────────────────────▲
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx
from torch import nn

from fxadapt.edges import EdgeTable
from fxadapt.mixed import MixedEdge

__all__ = ["MIXED_ROOT", "insert_mixed_edges"]

# Name of the submodule that contains the mixed edges of a wrapped GraphModule.
MIXED_ROOT = "fxadapt_mixed"


def insert_mixed_edges(
    graph_module: torch.fx.GraphModule, table: EdgeTable
) -> torch.fx.GraphModule:
    """Returns a copy of ``graph_module`` with a mixed edge on every edge of ``table``.

    Args:
        graph_module: the traced model the table was made from. It is not changed.
        table: the edge table; each edge's ``theta`` names the mixed-edge module it uses.

    Returns:
        A new GraphModule with the submodule ``fxadapt_mixed`` holding one ``MixedEdge`` per
        theta group.

    Raises:
        ValueError: when the table names a node the graph does not have, or edges that share
            a theta admit different options.
    """
    if hasattr(graph_module, MIXED_ROOT):
        raise ValueError("the model already contains mixed edges: pass the traced model instead")
    result = copy.deepcopy(graph_module)
    graph = result.graph
    name_to_node = {node.name: node for node in graph.nodes}

    mixed_edges = nn.ModuleDict()
    for theta, edges in table.theta_groups().items():
        options = {tuple(edge.options) for edge in edges}
        if len(options) > 1:
            raise ValueError(f"edges sharing theta {theta} admit different options: {options}")
        mixed_edges[theta] = MixedEdge(edges[0].options)
    result.add_module(MIXED_ROOT, mixed_edges)

    # New shortcuts go last: they hand a merge's users a new sum, and the mixed edges that
    # read the merge must see that sum too.
    for edge in sorted(table.edges, key=lambda edge: edge.shortcut):
        try:
            entry = name_to_node[edge.entry]
            exit_node = name_to_node[edge.exit]
            consumer = name_to_node[edge.consumer or edge.exit]
        except KeyError as err:
            raise ValueError(
                f"edge {edge.name} names node {err.args[0]!r}, which the graph does not have: "
                "the edge table was made from another model"
            ) from err
        target = f"{MIXED_ROOT}.{edge.theta}"
        if edge.shortcut:
            _add_shortcut(graph, edge, entry, consumer, target)
        elif not edge.consumer:
            _mix_every_use(graph, edge, entry, exit_node, target)
        else:
            with graph.inserting_before(consumer):
                mixed = graph.call_module(target, (entry, exit_node))
            _copy_meta(mixed, consumer, exit_node, edge)
            _replace_argument(consumer, edge.consumer_arg, exit_node, mixed)

    graph.lint()
    result.recompile()
    return result


def _add_shortcut(graph, edge, entry, merge, target) -> None:
    """Adds ``merge + mixed(entry)`` after the merge and hands it to the merge's users."""
    users = list(merge.users)
    with graph.inserting_after(merge):
        mixed = graph.call_module(target, (entry, entry))
    with graph.inserting_after(mixed):
        merged = graph.call_function(operator.add, (merge, mixed))
    _copy_meta(mixed, merge, merge, edge)
    merged.meta["fxadapt"] = {**merge.meta.get("fxadapt", {}), "shortcut_merge": edge.id}
    if "tensor_meta" in merge.meta:
        merged.meta["tensor_meta"] = merge.meta["tensor_meta"]
    for user in users:
        user.replace_input_with(merge, merged)


def _mix_every_use(graph, edge, entry, exit_node, target) -> None:
    """Passes every use of a layer edge's exit through its mixed edge."""
    users = list(exit_node.users)
    with graph.inserting_after(exit_node):
        mixed = graph.call_module(target, (entry, exit_node))
    _copy_meta(mixed, exit_node, exit_node, edge)
    for user in users:
        user.replace_input_with(exit_node, mixed)


def _copy_meta(mixed, origin, value, edge) -> None:
    mixed.meta["fxadapt"] = {**origin.meta.get("fxadapt", {}), "mixed_edge": edge.id}
    if "tensor_meta" in value.meta:
        mixed.meta["tensor_meta"] = value.meta["tensor_meta"]


def _replace_argument(node: torch.fx.Node, position: int, old: torch.fx.Node, new: torch.fx.Node):
    """Replaces the argument at ``position`` (positional, then keyword) of ``node``."""
    args = list(node.args)
    if position < len(args):
        if args[position] is not old:
            raise ValueError(f"node {node.name} does not read {old.name} at position {position}")
        args[position] = new
        node.args = tuple(args)
        return
    key = list(node.kwargs)[position - len(args)]
    node.kwargs = {**node.kwargs, key: new}
