"""Guard: no merge loses all its inputs, and every output still depends on every input.

The guard works on decisions, before the graph is rewritten. If every input of a merge picked
none, the merge would pass zeros on, and everything after it would see no signal (the failure
NAT reports). The input with the highest theta among its other options keeps its best other
option instead::

    decisions before:   a ──none──▶ add ◀──none── b      (theta_same: a 0.3, b -0.1)
    decisions after:    a ──same──▶ add ◀──none── b      (a is marked as guarded)

``check_reachability`` runs on the derived graph as a last check of the same promise.
"""

from __future__ import annotations

import copy
import logging

import networkx as nx
import torch.fx

from fxadapt.analysis import dataflow_graph
from fxadapt.edges import OPTIONS, Edge, EdgeTable
from fxadapt.errors import FxadaptError

__all__ = ["guard_decisions", "check_reachability"]

logger = logging.getLogger(__name__)


def guard_decisions(table: EdgeTable) -> EdgeTable:
    """Returns a copy of ``table`` in which no merge has lost all its inputs.

    Args:
        table: an edge table whose edges all carry a decision and their theta values.

    Returns:
        The new table. Edges whose decision the guard changed have ``guarded`` set.

    Raises:
        ValueError: when an edge has no decision yet.
    """
    result = copy.deepcopy(table)
    undecided = [edge.name for edge in result.edges if edge.decision is None]
    if undecided:
        raise ValueError(f"edges {', '.join(undecided)} have no decision: decide them first")

    merge_to_inputs = {node.name: node.inputs for node in result.nas_nodes if node.kind == "merge"}
    merge_to_edges: dict[str, list[Edge]] = {}
    for edge in result.edges:
        if edge.merge:
            merge_to_edges.setdefault(edge.merge, []).append(edge)

    for merge, edges in merge_to_edges.items():
        original_inputs = sum(not edge.shortcut for edge in edges)
        every_input_is_an_edge = original_inputs >= merge_to_inputs.get(merge, original_inputs)
        if every_input_is_an_edge and all(edge.decision == "none" for edge in edges):
            _keep_strongest(merge, edges)
    return result


def _keep_strongest(merge: str, edges: list[Edge]) -> None:
    def best_other_option(edge: Edge) -> tuple[float, str]:
        values = edge.theta_values or {}
        candidates = [option for option in OPTIONS if option != "none" and option in values]
        option = max(candidates, key=lambda option: (values[option], -OPTIONS.index(option)))
        return values[option], option

    strongest = max(edges, key=lambda edge: (best_other_option(edge)[0], -edge.id))
    _, option = best_other_option(strongest)
    strongest.decision = option
    strongest.guarded = True
    logger.warning(
        "every input of merge %s chose none; the guard keeps edge %s as %s",
        merge,
        strongest.name,
        option,
    )


def check_reachability(
    graph_module: torch.fx.GraphModule, reference: torch.fx.GraphModule | None = None
) -> None:
    """Checks that every output of ``graph_module`` depends on every graph input.

    Outputs are compared by their position in the output structure.

    Args:
        graph_module: the derived module.
        reference: the module it was derived from. When given, an output needs to depend
            only on the inputs it depended on in the reference.

    Raises:
        FxadaptError: naming the output and the input that it no longer depends on.
    """
    reached = _input_to_reached_outputs(graph_module)
    if reference is not None:
        required = _input_to_reached_outputs(reference)
    else:
        every_output = set(range(_output_count(graph_module)))
        required = {name: every_output for name in reached}
    for input_name, outputs in required.items():
        missing = sorted(outputs - reached.get(input_name, set()))
        if missing:
            raise FxadaptError(
                f"after derivation output {missing[0]} no longer depends on input "
                f"{input_name}: the guard failed to keep a merge alive; rerun with --debug "
                "and report the edge table"
            )


def _output_values(graph: torch.fx.Graph) -> list:
    output_node = next(node for node in graph.nodes if node.op == "output")
    return list(torch.utils._pytree.tree_leaves(output_node.args[0]))


def _output_count(graph_module: torch.fx.GraphModule) -> int:
    return len(_output_values(graph_module.graph))


def _input_to_reached_outputs(graph_module: torch.fx.GraphModule) -> dict[str, set[int]]:
    """Returns graph input name to the positions of the outputs that depend on it."""
    graph = graph_module.graph
    dataflow = dataflow_graph(graph)
    outputs = _output_values(graph)
    result = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            reached = nx.descendants(dataflow, node) | {node}
            result[node.name] = {
                position for position, value in enumerate(outputs) if value in reached
            }
    return result
