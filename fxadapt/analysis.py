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
from torch import nn

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
        module = graph_module.get_submodule(node.target)
        name = type(module).__name__
        if isinstance(module, nn.modules.conv._ConvNd):
            # Kernel, stride, dilation and depthwise grouping tell operations apart (DARTS'
            # sep_conv_3x3 from dil_conv_3x3, ProxylessNAS' 3x3 from 7x7 blocks); widths do not.
            details = ["x".join(str(size) for size in module.kernel_size)]
            if any(step != 1 for step in module.stride):
                details.append(f"s{module.stride[0]}")
            if any(rate != 1 for rate in module.dilation):
                details.append(f"d{module.dilation[0]}")
            if module.groups > 1 and module.groups == module.in_channels:
                details.append("dw")
            name += f"({','.join(details)})"
        return name
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
    shortcuts: bool = False,
) -> EdgeTable:
    """Finds the adaptable edges of a traced graph whose nodes carry shapes.

    Args:
        graph_module: a traced model after ``propagate_shapes``.
        granularity: ``branch`` (edges end at merges) or ``layer``.
        scope: ``full`` (a theta per edge) or ``cell`` (a theta per edge position of a cell
            type).
        leaves: module path to the reason it was traced as a leaf, copied into the table.
        model: the model's name or specification, copied into the table.
        shortcuts: also add placeholder edges whose original operation is none, from NAS
            nodes of a merge's shape (in its cell, or the input of the previous cell) to the
            merge, so that training can turn them into new skip connections.

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
    graph = graph_module.graph
    if not any("tensor_meta" in node.meta for node in graph.nodes):
        raise TraceError("the graph has no shapes: run fxadapt.tracing.propagate_shapes first")

    facts = _GraphFacts(graph_module, granularity)
    edges = _find_edges(graph_module, facts)
    if granularity == "layer":
        edges += _layer_edges(graph_module, facts, edges)
    if shortcuts:
        edges += _shortcut_edges(facts, edges)
    edges = _in_graph_order(edges, facts)
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
    """Facts about a graph: its data nodes, merges, NAS nodes and region boundaries."""

    def __init__(self, graph_module: torch.fx.GraphModule, granularity: str):
        graph = graph_module.graph
        self.name_to_node = {node.name: node for node in graph.nodes}
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
        self.cuts = _layer_group_ends(graph_module, self.data) if granularity == "layer" else []
        # Regions stop at these nodes: NAS nodes, and at layer granularity the layer-group ends.
        self.boundaries = self.nas | set(self.cuts)

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
    entries = _entries(region, facts) if region else [value]
    if len(entries) != 1:
        logger.info(
            "the input %s of merge %s reads %d NAS nodes, so it is not an edge",
            value.name,
            merge.name,
            len(entries),
        )
        return None

    edge = _make_edge(graph_module, facts, entries[0], value, region, merge=merge)
    edge.id = edge_id
    edge.consumer = consumer.name
    edge.consumer_arg = position
    options = ["same"]
    if region and _same_kind(entries[0], value):
        options.append("identity")
    edge.options = options + ["none"]
    return edge


def _entries(region: set[torch.fx.Node], facts: _GraphFacts) -> list[torch.fx.Node]:
    """Returns the data nodes outside ``region`` that nodes of the region read."""
    sources = {
        source
        for node in region
        for source in node.all_input_nodes
        if source not in region and source in facts.data
    }
    return sorted(sources, key=facts.order.get)


def _make_edge(graph_module, facts, entry, exit_node, region, *, merge) -> Edge:
    data_nodes = sorted((node for node in region if node in facts.data), key=facts.order.get)
    return Edge(
        id=0,
        cell="",
        cell_type="",
        position=0,
        entry=entry.name,
        exit=exit_node.name,
        merge=merge.name if merge is not None else "",
        consumer="",
        consumer_arg=-1,
        nodes=[node.name for node in data_nodes],
        ops=[op_label(node, graph_module) for node in data_nodes],
        options=[],
        theta="",
        input_shape=list(_shape(entry)),
        output_shape=list(_shape(exit_node)),
    )


def _same_kind(first: torch.fx.Node, second: torch.fx.Node) -> bool:
    """Returns True when the two values have the same shape and dtype."""
    return _shape(first) == _shape(second) and _dtype(first) == _dtype(second)


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
            if node.op == "placeholder" or node in facts.boundaries:
                continue
            if all(user in region for user in node.users):
                region.add(node)
                grew = True
    return region


_GROUP_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
_GROUP_FOLLOWERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
)
_FOLLOWER_FUNCTIONS = {
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "silu",
    "hardswish",
    "hardtanh",
    "leaky_relu",
    "sigmoid",
    "tanh",
}


def _layer_group_ends(graph_module: torch.fx.GraphModule, data: set) -> list[torch.fx.Node]:
    """Returns the last node of every layer group: a conv or linear with its norm and activation."""
    ends = []
    for node in graph_module.graph.nodes:
        if node.op != "call_module" or node not in data:
            continue
        if not isinstance(graph_module.get_submodule(node.target), _GROUP_LAYERS):
            continue
        end = node
        while len(end.users) == 1:
            user = next(iter(end.users))
            if user.all_input_nodes != [end] or not _is_follower(user, graph_module):
                break
            end = user
        ends.append(end)
    return ends


def _is_follower(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(graph_module.get_submodule(node.target), _GROUP_FOLLOWERS)
    if node.op in ("call_function", "call_method"):
        return getattr(node.target, "__name__", str(node.target)) in _FOLLOWER_FUNCTIONS
    return False


def _layer_edges(graph_module, facts: _GraphFacts, merge_edges: list[Edge]) -> list[Edge]:
    """Returns an edge for every shape-preserving piece of a chain that ends a layer group.

    Pieces that feed a merge are merge edges already. The others admit identity only.
    """
    merge_exits = {edge.exit for edge in merge_edges}
    edges = []
    for end in facts.cuts:
        if end.name in merge_exits or end in facts.merge_args:
            continue
        region = _exclusive_region(end, facts)
        entries = _entries(region, facts)
        if len(entries) != 1 or not _same_kind(entries[0], end):
            continue
        edge = _make_edge(graph_module, facts, entries[0], end, region, merge=None)
        edge.options = ["same", "identity"]
        edges.append(edge)
    return edges


def _shortcut_edges(facts: _GraphFacts, edges: list[Edge]) -> list[Edge]:
    """Returns placeholder edges, original operation none, that can become new skips."""
    merge_to_entries: dict[str, set[str]] = {}
    for edge in edges:
        if edge.merge:
            merge_to_entries.setdefault(edge.merge, set()).add(edge.entry)
    cells = []
    cell_to_inputs: dict[str, list[torch.fx.Node]] = {}
    for merge in facts.merges:
        cell = node_info(merge).get("module_path", "")
        if cell not in cell_to_inputs:
            cells.append(cell)
            cell_to_inputs[cell] = []
    for edge in edges:
        entry = facts.name_to_node[edge.entry]
        cell = node_info(facts.name_to_node[edge.target]).get("module_path", "")
        if (
            cell in cell_to_inputs
            and not _inside(entry, cell)
            and entry not in cell_to_inputs[cell]
        ):
            cell_to_inputs[cell].append(entry)

    shortcuts = []
    for merge in facts.merges:
        cell = node_info(merge).get("module_path", "")
        index = cells.index(cell)
        candidates = [
            node
            for node in facts.order
            if node in facts.nas and facts.order[node] < facts.order[merge] and _inside(node, cell)
        ]
        candidates += cell_to_inputs[cell]
        if index > 0:
            candidates += cell_to_inputs[cells[index - 1]]
        connected = merge_to_entries.get(merge.name, set())
        for source in dict.fromkeys(candidates):
            if source.name in connected or not _same_kind(source, merge):
                continue
            connected.add(source.name)
            shortcuts.append(
                Edge(
                    id=0,
                    cell="",
                    cell_type="",
                    position=0,
                    entry=source.name,
                    exit=source.name,
                    merge=merge.name,
                    consumer=merge.name,
                    consumer_arg=-1,
                    nodes=[],
                    ops=[],
                    options=["identity", "none"],
                    theta="",
                    input_shape=list(_shape(source)),
                    output_shape=list(_shape(merge)),
                    shortcut=True,
                )
            )
    return shortcuts


def _inside(node: torch.fx.Node, cell: str) -> bool:
    path = node_info(node).get("module_path", "")
    return path == cell or path.startswith(cell + ".") if cell else path == ""


def _in_graph_order(edges: list[Edge], facts: _GraphFacts) -> list[Edge]:
    """Sorts edges by the node they end at and numbers them from 0."""

    def key(edge: Edge):
        target = facts.order[facts.name_to_node[edge.target]]
        return (
            target,
            edge.shortcut,
            edge.consumer_arg,
            facts.order[facts.name_to_node[edge.exit]],
        )

    ordered = sorted(edges, key=key)
    for index, edge in enumerate(ordered):
        edge.id = index
    return ordered


def _assign_cells(edges: list[Edge], facts: _GraphFacts) -> dict[str, list[str]]:
    """Sets each edge's cell, position and cell type; returns cell type to cell paths."""
    name_to_node = facts.name_to_node
    for edge in edges:
        edge.cell = node_info(name_to_node[edge.target]).get("module_path", "")
    # A layer edge belongs to the nearest enclosing module that contains merges, so the layers
    # inside a DARTS operation count as part of their cell.
    merge_cells = {edge.cell for edge in edges if edge.merge}
    for edge in edges:
        if not edge.merge:
            edge.cell = _enclosing_cell(edge.cell, merge_cells)
    cell_to_edges: dict[str, list[Edge]] = {}
    for edge in edges:
        cell_to_edges.setdefault(edge.cell, []).append(edge)

    signature_to_cells: dict[tuple, list[str]] = {}
    for cell, cell_edges in cell_to_edges.items():
        for position, edge in enumerate(cell_edges):
            edge.position = position
        typed = next((edge for edge in cell_edges if edge.merge), cell_edges[0])
        module_type = node_info(name_to_node[typed.target]).get("module_type", "")
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


def _enclosing_cell(path: str, merge_cells: set[str]) -> str:
    parts = path.split(".") if path else []
    for length in range(len(parts), -1, -1):
        candidate = ".".join(parts[:length])
        if candidate in merge_cells:
            return candidate
    return path


def _cell_topology(cell_edges: list[Edge]) -> tuple:
    """Returns the structure of a cell's edges with node names replaced by local indices."""
    local: dict[str, int] = {}
    for edge in cell_edges:
        local.setdefault(edge.entry, len(local))
        local.setdefault(edge.target, len(local))
    return tuple(
        (local[edge.entry], local[edge.target], tuple(edge.ops), tuple(edge.options))
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
    for node in facts.cuts:
        kinds.setdefault(node, "layer")
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
