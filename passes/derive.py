"""Derive: replace every mixed edge by the option it chose, and drop what no longer runs.

Takes a wrapped GraphModule (from ``insert``) and an edge table with decisions, and returns a
plain GraphModule with no theta and no fxadapt module in it. The result computes what the
mixed network computed at the moment of derivation with the theta of the options not chosen
set to zero:

- ``same``: ``theta_same * o(x)``. The scale becomes a constant multiply, which
  ``fold_theta_scales`` then folds into the edge's last affine layer where it can.
- ``identity``: ``theta_identity * x``; the edge's operation is dropped.
- ``none``: the merge loses the input; a merge left with one input is replaced by it.

Before, with e1 decided none and e0 decided same at theta_same 1::

    x ──o──▶ out ──▶ mixed_e0 ──▶ add ◀── mixed_e1 ◀── x

After::

    x ──o──▶ out ──▶ (the add's users)

Dead code, including the operation of every none or identity edge and its weights, is
eliminated, so the derived module never has more parameters or FLOPs than the original.
Last, ``use_inplace_operations`` lets ReLUs and residual adds write into their input.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx

from fxadapt.edges import OPTIONS, EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.passes.fold import THETA_SCALE, fold_theta_scales
from fxadapt.passes.guard import check_reachability, guard_decisions
from fxadapt.passes.inplace import use_inplace_operations
from fxadapt.passes.insert import MIXED_ROOT
from fxadapt.tracing import node_info

__all__ = ["decide", "derive"]

logger = logging.getLogger(__name__)


def decide(
    graph_module: torch.fx.GraphModule,
    table: EdgeTable,
    edge_id_to_decision: dict[int, str] | None = None,
) -> EdgeTable:
    """Returns a copy of ``table`` with a decision and the theta values for every edge.

    Each edge keeps its highest-weighted option; ties go to the more conservative option
    (same, then identity, then none). The guard then keeps every merge alive.

    Args:
        graph_module: a wrapped GraphModule whose theta have been trained.
        table: its edge table.
        edge_id_to_decision: decisions to apply instead of reading them from theta, as when a
            derived run is rebuilt from a checkpoint. The guard applies to them too.

    Returns:
        The edge table with decisions.

    Raises:
        ValueError: when a given decision is an option the edge does not admit.
    """
    result = copy.deepcopy(table)
    mixed_edges = getattr(graph_module, MIXED_ROOT)
    for edge in result.edges:
        edge.theta_values = mixed_edges[edge.theta].theta()
        if edge_id_to_decision is None:
            edge.decision = _best_option(edge.theta_values, shortcut=edge.shortcut)
            continue
        decision = edge_id_to_decision.get(edge.id)
        if decision not in edge.options:
            raise ValueError(
                f"decision {decision!r} for edge {edge.name} is not one of its options "
                f"{edge.options}: the decisions come from another model or options"
            )
        edge.decision = decision
    result = guard_decisions(result)
    for edge in result.edges:
        logger.debug("edge %s: %s %s", edge.name, edge.decision, edge.theta_values)
    return result


def _best_option(theta_values: dict[str, float], *, shortcut: bool = False) -> str:
    # For a new shortcut the original operation is none, so none is the conservative option.
    order = ("none", "identity", "same") if shortcut else OPTIONS
    best = None
    for option in order:
        if option in theta_values and (best is None or theta_values[option] > theta_values[best]):
            best = option
    return best


def derive(graph_module: torch.fx.GraphModule, table: EdgeTable) -> torch.fx.GraphModule:
    """Returns the derived module: every mixed edge replaced by its decision.

    Args:
        graph_module: a wrapped GraphModule. It is not changed.
        table: its edge table, with decisions (see ``decide``).

    Returns:
        A plain GraphModule with no mixed edges, the unused operations and weights removed
        and theta_same folded into affine layers where possible.

    Raises:
        ValueError: when an edge has no decision.
        FxadaptError: when the derived graph lost the dependency of an output on an input.
    """
    undecided = [edge.name for edge in table.edges if edge.decision is None]
    if undecided:
        raise ValueError(f"edges {', '.join(undecided)} have no decision: call decide() first")
    result = copy.deepcopy(graph_module)
    graph = result.graph
    id_to_edge = {edge.id: edge for edge in table.edges}

    none_values: set[torch.fx.Node] = set()
    for node in list(graph.nodes):
        edge_id = node_info(node).get("mixed_edge")
        if node.op != "call_module" or edge_id is None:
            continue
        edge = id_to_edge[edge_id]
        if edge.decision == "none":
            none_values.add(node)
        else:
            node.replace_all_uses_with(_chosen_value(graph, node, edge.decision, edge))
            graph.erase_node(node)

    _drop_none_inputs(graph, none_values)
    graph.eliminate_dead_code()
    delattr(result, MIXED_ROOT)
    result.delete_all_unused_submodules()
    graph.lint()
    result.recompile()

    folded = fold_theta_scales(result)
    check_reachability(folded, graph_module)
    return use_inplace_operations(folded)


def _chosen_value(graph, mixed, decision, edge) -> torch.fx.Node:
    """Returns the node that computes the chosen option, adding a scale where theta != 1."""
    entry, exit_node = mixed.args
    value = exit_node if decision == "same" else entry
    scale = edge.theta_values[decision]
    if scale == 1.0:
        return value
    with graph.inserting_before(mixed):
        scaled = graph.call_function(torch.mul, (value, scale))
    scaled.meta["fxadapt"] = {**node_info(mixed), THETA_SCALE: True}
    scaled.meta.pop("tensor_meta", None)
    if "tensor_meta" in value.meta:
        scaled.meta["tensor_meta"] = value.meta["tensor_meta"]
    return scaled


def _drop_none_inputs(graph: torch.fx.Graph, none_values: set[torch.fx.Node]) -> None:
    """Rewrites every add that reads a none value: it becomes its other input, or none."""
    for node in list(graph.nodes):
        if node.op == "output" and none_values & set(node.all_input_nodes):
            raise FxadaptError("a merge lost all its inputs and the guard did not catch it")
        pruned = [arg for arg in node.all_input_nodes if arg in none_values]
        if not pruned:
            continue
        kept = [arg for arg in node.all_input_nodes if arg not in none_values]
        if len(node.all_input_nodes) != 2 or len(kept) > 1:
            raise FxadaptError(
                f"node {node.name} reads a merge that lost all its inputs; the guard should "
                "have kept one: rerun with --debug and report the edge table"
            )
        if kept:
            node.replace_all_uses_with(kept[0])
        else:
            none_values.add(node)
