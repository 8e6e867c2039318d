"""Finding NAS nodes, merges and edges in a traced graph, and the options each edge admits.

The analysis reads a GraphModule whose nodes carry shapes (``node.meta["tensor_meta"]``, from
``fxadapt.tracing.propagate_shapes``) and returns an ``EdgeTable``. It changes nothing.

A *merge* is an add of two or more values that depend on the graph inputs and have the
merge's shape. Adds of parameters, buffers or constants (a bias, a positional embedding) and
products (gates, attention) are not merges. ``a + b + c`` whose inner sum has no other use is
one merge of three inputs.

An *edge* at ``branch`` granularity is the operation that computes one input of a merge: the
nodes whose values reach nothing but that input, back to the NAS node they start from. Forks
whose every use lies inside the operation (the gate of a squeeze-excitation block) belong to
it. An input that is itself a NAS node gives an empty edge, an identity skip.
"""

from __future__ import annotations

import logging
import operator
import re

import networkx as nx
import torch
import torch.fx

from fxadapt.edges import Edge, EdgeTable, NasNode
from fxadapt.errors import TraceError
from fxadapt.tracing import node_info

__all__ = ["GRANULARITIES", "SCOPES", "analyse", "dataflow_graph", "op_label"]

logger = logging.getLogger(__name__)

GRANULARITIES = ("branch", "layer")
SCOPES = ("full", "cell")

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def dataflow_graph(graph: torch.fx.Graph) -> nx.DiGraph:
    """Returns the graph's nodes as a networkx DiGraph with an arc from each input to its user."""
    dataflow = nx.DiGraph()
    for node in graph.nodes:
        dataflow.add_node(node)
        for source in node.all_input_nodes:
            dataflow.add_edge(source, node)
    return dataflow


def op_label(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> str:
    """Returns a short name for the operation of ``node``, such as ``Conv2d`` or ``relu``."""
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target)).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def analyse(
    graph_module: torch.fx.GraphModule,
    *,
    granularity: str = "branch",
    scope: str = "full",
    leaves: dict[str, str] | None = None,
    model: str = "",
) -> EdgeTable:
    """Finds the adaptable edges of a traced graph whose nodes carry shapes.

    Args:
        graph_module: a traced model after ``propagate_shapes``.
        granularity: ``branch`` (edges end at merges) or ``layer``.
        scope: ``full`` (a theta per edge) or ``cell`` (a theta per edge position of a cell
            type).
        leaves: module path to the reason it was traced as a leaf, copied into the table.
        model: the model's name or specification, copied into the table.

    Returns:
        The edge table, with no decisions yet.

    Raises:
        ValueError: for an unknown granularity or scope.
        TraceError: when the graph carries no shapes.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}: use one of {GRANULARITIES}")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}: use one of {SCOPES}")
    if granularity == "layer":
        raise NotImplementedError("layer granularity is not available yet: use 'branch'")
    graph = graph_module.graph
    if not any("tensor_meta" in node.meta for node in graph.nodes):
        raise TraceError("the graph has no shapes: run fxadapt.tracing.propagate_shapes first")

    facts = _GraphFacts(graph)
    edges = _find_edges(graph_module, facts)
    cell_types = _assign_cells(edges, facts)
    _assign_theta(edges, scope)
    return EdgeTable(
        edges=edges,
        nas_nodes=_nas_node_table(graph, facts),
        cell_types=cell_types,
        leaves=dict(leaves or {}),
        granularity=granularity,
        scope=scope,
        model=model,
    )


class _GraphFacts:
    """Which nodes carry data, which are merges and which are NAS nodes."""

    def __init__(self, graph: torch.fx.Graph):
        self.order = {node: index for index, node in enumerate(graph.nodes)}
        dataflow = dataflow_graph(graph)
        inputs = [node for node in graph.nodes if node.op == "placeholder"]
        self.data = set(inputs)
        for node in inputs:
            self.data |= nx.descendants(dataflow, node)
        self.data = {node for node in self.data if _is_tensor(node)}

        self.merge_args = {node: args for node in graph.nodes if (args := self._merge_args(node))}
        self.absorbed = {
            arg
            for node, args in self.merge_args.items()
            for arg in args
            if arg in self.merge_args and _use_count(arg) == 1
        }
        self.merges = [node for node in self.merge_args if node not in self.absorbed]
        self.inputs = inputs
        self.forks = [
            node
            for node in graph.nodes
            if node in self.data and _use_count(node) > 1 and node not in self.merge_args
        ]
        self.outputs = [node for node in graph.nodes if node.op == "output"]
        self.nas = set(self.inputs) | set(self.forks) | set(self.merges)

    def _merge_args(self, node: torch.fx.Node) -> list[torch.fx.Node] | None:
        """Returns the data inputs of ``node`` when it is an additive merge, else None."""
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        )
        if not is_add or node not in self.data or set(node.kwargs) - {"other"}:
            return None
        args = [*node.args, *node.kwargs.values()]
        if len(args) != 2 or not all(arg in self.data for arg in args):
            return None
        shape = _shape(node)
        if any(_shape(arg) != shape for arg in args):
            return None
        return args

    def flat_inputs(self, merge: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node, int]]:
        """Returns (value, consumer, argument position) for every input of a merge."""
        flat = []
        for position, arg in enumerate(self.merge_args[merge]):
            if arg in self.absorbed:
                flat.extend(self.flat_inputs(arg))
            else:
                flat.append((arg, merge, position))
        return flat


def _find_edges(graph_module: torch.fx.GraphModule, facts: _GraphFacts) -> list[Edge]:
    edges: list[Edge] = []
    for merge in facts.merges:
        for value, consumer, position in facts.flat_inputs(merge):
            edge = _edge_into(graph_module, facts, merge, value, consumer, position, len(edges))
            if edge is not None:
                edges.append(edge)
    return edges


def _edge_into(graph_module, facts, merge, value, consumer, position, edge_id) -> Edge | None:
    region = _exclusive_region(value, facts)
    entries = sorted(
        {
            source
            for node in region
            for source in node.all_input_nodes
            if source not in region and source in facts.data
        },
        key=facts.order.get,
    )
    if not region:
        entries = [value]
    if len(entries) != 1:
        logger.info(
            "the input %s of merge %s reads %d NAS nodes, so it is not an edge",
            value.name,
            merge.name,
            len(entries),
        )
        return None

    entry = entries[0]
    data_nodes = sorted((node for node in region if node in facts.data), key=facts.order.get)
    options = ["same"]
    if data_nodes and _shape(entry) == _shape(value) and _dtype(entry) == _dtype(value):
        options.append("identity")
    options.append("none")
    return Edge(
        id=edge_id,
        cell="",
        cell_type="",
        position=0,
        entry=entry.name,
        exit=value.name,
        merge=merge.name,
        consumer=consumer.name,
        consumer_arg=position,
        nodes=[node.name for node in data_nodes],
        ops=[op_label(node, graph_module) for node in data_nodes],
        options=options,
        theta="",
        input_shape=list(_shape(entry)),
        output_shape=list(_shape(value)),
    )


def _exclusive_region(value: torch.fx.Node, facts: _GraphFacts) -> set[torch.fx.Node]:
    """Returns the nodes whose every use leads only to ``value``, ``value`` included.

    A node joins once all its users have joined, so the inputs are swept in reverse graph
    order until the region stops growing.
    """
    if value in facts.nas:
        return set()
    region = {value}
    grew = True
    while grew:
        grew = False
        candidates = {source for node in region for source in node.all_input_nodes} - region
        for node in sorted(candidates, key=facts.order.get, reverse=True):
            if node.op == "placeholder" or node in facts.nas:
                continue
            if all(user in region for user in node.users):
                region.add(node)
                grew = True
    return region


def _assign_cells(edges: list[Edge], facts: _GraphFacts) -> dict[str, list[str]]:
    """Sets each edge's cell, position and cell type; returns cell type to cell paths."""
    name_to_node = {node.name: node for node in facts.order}
    cell_to_edges: dict[str, list[Edge]] = {}
    for edge in edges:
        edge.cell = node_info(name_to_node[edge.merge]).get("module_path", "")
        cell_to_edges.setdefault(edge.cell, []).append(edge)

    signature_to_cells: dict[tuple, list[str]] = {}
    for cell, cell_edges in cell_to_edges.items():
        for position, edge in enumerate(cell_edges):
            edge.position = position
        module_type = node_info(name_to_node[cell_edges[0].merge]).get("module_type", "")
        signature = (module_type, _cell_topology(cell_edges))
        signature_to_cells.setdefault(signature, []).append(cell)

    class_to_count: dict[str, int] = {}
    for module_type, _ in signature_to_cells:
        class_to_count[module_type] = class_to_count.get(module_type, 0) + 1
    cell_types: dict[str, list[str]] = {}
    class_to_seen: dict[str, int] = {}
    for (module_type, _), cells in signature_to_cells.items():
        name = module_type or "root"
        if class_to_count[module_type] > 1:
            class_to_seen[module_type] = class_to_seen.get(module_type, 0) + 1
            name = f"{name}-{class_to_seen[module_type]}"
        cell_types[name] = cells
        for cell in cells:
            for edge in cell_to_edges[cell]:
                edge.cell_type = name
    return cell_types


def _cell_topology(cell_edges: list[Edge]) -> tuple:
    """Returns the structure of a cell's edges with node names replaced by local indices."""
    local: dict[str, int] = {}
    for edge in cell_edges:
        local.setdefault(edge.entry, len(local))
        local.setdefault(edge.merge, len(local))
    return tuple(
        (local[edge.entry], local[edge.merge], tuple(edge.ops), tuple(edge.options))
        for edge in cell_edges
    )


def _assign_theta(edges: list[Edge], scope: str) -> None:
    for edge in edges:
        if scope == "full":
            edge.theta = edge.name
        else:
            edge.theta = re.sub(r"\W", "_", f"{edge.cell_type}_p{edge.position}")


def _nas_node_table(graph: torch.fx.Graph, facts: _GraphFacts) -> list[NasNode]:
    kinds = {node: "input" for node in facts.inputs}
    kinds.update({node: "fork" for node in facts.forks})
    kinds.update({node: "merge" for node in facts.merges})
    kinds.update({node: "output" for node in facts.outputs})
    return [
        NasNode(
            name=node.name,
            kind=kinds[node],
            cell=node_info(node).get("module_path", ""),
            shape=list(_shape(node)),
            inputs=len(facts.flat_inputs(node)) if kinds[node] == "merge" else 0,
        )
        for node in graph.nodes
        if node in kinds
    ]


def _is_tensor(node: torch.fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape")


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _dtype(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def _use_count(node: torch.fx.Node) -> int:
    """Returns how many argument slots read ``node`` (``x + x`` reads it twice)."""
    count = 0
    for user in node.users:
        args = torch.fx.node.map_arg((user.args, user.kwargs), lambda n: n)
        flat: list = []
        torch.fx.node.map_arg(args, flat.append)
        count += sum(1 for item in flat if item is node)
    return count
