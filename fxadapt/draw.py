"""Graphviz diagrams of cell types and of whole networks, with the edges that changed in red.

Two kinds of diagram come from an edge table:

- ``draw_cell_types`` draws one diagram per cell type, as a small directed graph whose NAS
  nodes are circles: the cell inputs ``c_{k-1}``, ``c_{k-2}``, ... and the merges of the cell
  ``0``, ``1``, .... Each edge position is one arrow, labelled with its operation and its
  options (before derivation) or its decision and theta (after).
- ``draw_network`` draws every computing node of a GraphModule, grouped in one cluster per
  cell, with the nodes and arrows of changed edges in red.

Edges whose decision is ``identity`` or ``none`` are red, and ``none`` edges are dashed. Both
functions write a ``.dot`` source next to each rendered file. Rendering needs Graphviz's
``dot`` program. Without it, only the ``.dot`` files are written and a logged warning gives
the commands that install Graphviz. Neither function changes the table or the graph module it reads.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import graphviz
import torch
import torch.fx

from fxadapt.analysis import op_label
from fxadapt.edges import OPTIONS, Edge, EdgeTable
from fxadapt.tracing import node_info

__all__ = ["RED", "draw_cell_types", "draw_network", "render", "short_ops"]

logger = logging.getLogger(__name__)

RED = "#d62728"
"""Colour of changed edges in every diagram."""

_BLACK = "#000000"
_INPUT_FILL = "#e8e8e8"
_CLUSTER_BORDER = "#9e9e9e"

_LEGEND = "red: changed (identity or none)   dashed: none   bold: kept by the guard"

# Abbreviations for operation labels, keyed by the lowercased label without its 1d/2d/3d suffix.
_OP_ABBREVIATIONS = {
    "batchnorm": "bn",
    "syncbatchnorm": "bn",
    "groupnorm": "gn",
    "layernorm": "ln",
    "adaptiveavgpool": "avgpool",
    "adaptive_avg_pool": "avgpool",
    "adaptivemaxpool": "maxpool",
    "adaptive_max_pool": "maxpool",
    "avg_pool": "avgpool",
    "max_pool": "maxpool",
}

# Characters per line of an edge label before the operation chain wraps.
_LABEL_WIDTH = 28

# Set once the missing-``dot`` warning has been logged, so later renders log it at debug level.
_missing_dot_warned = False


def render(
    dot_source: graphviz.Digraph, stem: str | Path, formats: str | Iterable[str]
) -> list[Path]:
    """Writes ``stem.dot`` and renders it with Graphviz's ``dot`` into each format.

    When ``dot`` is not installed, the ``.dot`` file is still written, a warning with install
    instructions is logged (once per process) and only the ``.dot`` path is returned.

    Args:
        dot_source: the diagram to write.
        stem: output path without suffix. The files are ``stem.dot`` and ``stem.<format>``.
        formats: Graphviz output formats such as ``("svg", "png")``. A single string is one
            format, and an empty sequence writes only the ``.dot`` file.

    Returns:
        The paths written: the ``.dot`` file first, then one file per rendered format.

    Raises:
        TypeError: when ``dot_source`` is not a Graphviz graph.
        ValueError: when a format is not in ``graphviz.FORMATS``.
        subprocess.CalledProcessError: when ``dot`` is installed but fails on the source.
    """
    if not isinstance(dot_source, (graphviz.Digraph, graphviz.Graph, graphviz.Source)):
        raise TypeError(f"dot_source must be a graphviz.Digraph, got {type(dot_source).__name__}")
    formats = _check_formats(formats)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)

    dot_path = stem.with_name(f"{stem.name}.dot")
    dot_path.write_text(dot_source.source)
    paths = [dot_path]
    for output_format in formats:
        output_path = stem.with_name(f"{stem.name}.{output_format}")
        try:
            graphviz.render("dot", output_format, dot_path, outfile=output_path, quiet=True)
        except graphviz.ExecutableNotFound:
            _log_missing_dot(dot_path, formats)
            return [dot_path]
        paths.append(output_path)
    logger.debug("wrote %s", ", ".join(str(path) for path in paths))
    return paths


def draw_cell_types(
    table: EdgeTable,
    out_dir: str | Path,
    *,
    formats: str | Iterable[str] = ("svg", "png"),
    title: str = "",
) -> list[Path]:
    """Draws one diagram per cell type, with its NAS nodes as circles and its edges as arrows.

    Each edge position of the cell type is one arrow from its entry to its merge, labelled
    with the operation (``skip`` for an empty edge). Before derivation every arrow is black
    and lists the options the edge admits. After derivation the label gives the decision and
    the theta values, and an arrow is red when its edge became ``identity`` or ``none``,
    dashed for ``none`` and bold when the guard kept it. In ``full`` scope the cells of one
    type may decide differently, so each arrow counts the decisions over the cells (``same in
    6, none in 1 of 7 cells``). It is red when any cell changed the edge and dashed when any
    cell chose ``none``.

    Args:
        table: the edge table, with or without decisions.
        out_dir: folder for the files, created when missing.
        formats: Graphviz output formats, as for ``render``.
        title: first line of each diagram's caption, or the model name when empty.

    Returns:
        The paths written, ``cell-<cell type>.dot`` and ``cell-<cell type>.<format>`` for each
        cell type, in the order of ``table.cell_types``.

    Raises:
        TypeError: when ``table`` is not an ``EdgeTable``.
        ValueError: when a format is not in ``graphviz.FORMATS``.
    """
    if not isinstance(table, EdgeTable):
        raise TypeError(f"table must be an EdgeTable, got {type(table).__name__}")
    formats = _check_formats(formats)
    out_dir = Path(out_dir)

    cell_type_to_cells = _cell_type_to_cells(table)
    if not cell_type_to_cells:
        logger.warning("the edge table has no edges, so no cell diagram was drawn")
        return []
    cell_to_edges = _cell_to_edges(table)
    paths: list[Path] = []
    for cell_type, cells in cell_type_to_cells.items():
        digraph = _cell_type_digraph(table, cell_type, cells, cell_to_edges, title)
        paths.extend(render(digraph, out_dir / f"cell-{_file_name(cell_type)}", formats))
    return paths


def draw_network(
    graph_module: torch.fx.GraphModule,
    table: EdgeTable,
    out_dir: str | Path,
    *,
    formats: str | Iterable[str] = ("svg", "png"),
    name: str = "network",
) -> list[Path]:
    """Draws every computing node of a network, grouped by cell, with changed edges in red.

    Each ``torch.fx`` node other than ``get_attr`` is one box, labelled with its short
    operation name, and its SVG tooltip gives the node's name. Nodes are grouped in one cluster
    per cell, captioned with the cell's module path and cell type. The nodes of edges whose
    decision is ``identity`` or ``none``, the mixed-edge nodes of those edges and the arrows
    that run along them into their merge are red, and dashed for ``none``. The graph module may
    be the wrapped one, the original traced one or the derived one. A derived module no
    longer contains the nodes of a ``none`` edge (and maybe not its merge), so such an edge is
    drawn as one red placeholder box in its cell, joined to the nodes that still exist.

    Args:
        graph_module: the traced, wrapped or derived network.
        table: the network's edge table, with or without decisions.
        out_dir: folder for the files, created when missing.
        formats: Graphviz output formats, as for ``render``.
        name: file name stem of the diagram.

    Returns:
        The paths written, ``<name>.dot`` and ``<name>.<format>``.

    Raises:
        TypeError: when ``graph_module`` is not a GraphModule or ``table`` not an EdgeTable.
        ValueError: when a format is not in ``graphviz.FORMATS`` or ``name`` is empty.
    """
    if not isinstance(graph_module, torch.fx.GraphModule):
        raise TypeError(
            f"graph_module must be a torch.fx.GraphModule, got {type(graph_module).__name__}"
        )
    if not isinstance(table, EdgeTable):
        raise TypeError(f"table must be an EdgeTable, got {type(table).__name__}")
    if not name:
        raise ValueError("name must be a non-empty file name stem, such as 'network'")
    formats = _check_formats(formats)

    digraph = _NetworkDrawing(graph_module, table, name).digraph()
    return render(digraph, Path(out_dir) / _file_name(name), formats)


def _check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    formats = tuple(formats)
    for output_format in formats:
        if output_format not in graphviz.FORMATS:
            raise ValueError(
                f"unknown Graphviz format {output_format!r}: use formats such as 'svg', 'png' "
                "or 'pdf'"
            )
    return formats


def _log_missing_dot(dot_path: Path, formats: Sequence[str]) -> None:
    global _missing_dot_warned
    if _missing_dot_warned:
        logger.debug("Graphviz's dot is missing, so only %s was written", dot_path)
        return
    _missing_dot_warned = True
    logger.warning(
        "Graphviz's dot program was not found on PATH, so only the .dot source was written "
        "(%s) and no %s. Install Graphviz with 'apt-get install graphviz' (Debian, Ubuntu), "
        "'brew install graphviz' (macOS) or from https://graphviz.org/download/, then draw "
        "again or run 'dot -Tsvg FILE.dot -o FILE.svg'.",
        dot_path,
        "/".join(formats),
    )


def _file_name(text: str) -> str:
    """Returns ``text`` with every character other than letters, digits, ``.-_`` as ``_``."""
    return re.sub(r"[^\w.-]", "_", text) or "root"


def _cell_type_to_cells(table: EdgeTable) -> dict[str, list[str]]:
    """Returns cell type to cells, from ``table.cell_types`` and the edges themselves.

    Edges name their cell type too, so a table whose ``cell_types`` is incomplete still gets
    a diagram for every cell type that has edges.
    """
    cell_type_to_cells = {
        cell_type: list(cells) for cell_type, cells in table.cell_types.items() if cells
    }
    for edge in table.edges:
        cells = cell_type_to_cells.setdefault(edge.cell_type, [])
        if edge.cell not in cells:
            cells.append(edge.cell)
    return cell_type_to_cells


def _cell_to_edges(table: EdgeTable) -> dict[str, list[Edge]]:
    cell_to_edges: dict[str, list[Edge]] = {}
    for edge in table.edges:
        cell_to_edges.setdefault(edge.cell, []).append(edge)
    for edges in cell_to_edges.values():
        edges.sort(key=lambda edge: edge.position)
    return cell_to_edges


def short_ops(ops: Sequence[str]) -> str:
    """Returns an operation chain as a short label, such as ``conv·bn·relu·conv·bn``.

    Each ``torch.nn`` layer and function is lowercased, loses its ``1d``/``2d``/``3d`` suffix
    and is abbreviated where a common short name exists. Other module classes keep their name.
    A run of one operation is written once with a count (``conv×2``). An empty chain is
    ``skip``. The label wraps into lines of about ``_LABEL_WIDTH`` characters.
    """
    if not ops:
        return "skip"
    words = [_short_op(op) for op in ops]
    runs: list[list] = []
    for word in words:
        if runs and runs[-1][0] == word:
            runs[-1][1] += 1
        else:
            runs.append([word, 1])
    parts = [word if count == 1 else f"{word}×{count}" for word, count in runs]

    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > _LABEL_WIDTH:
            lines[-1] += "·"
            lines.append(part)
        else:
            lines[-1] += "·" + part
    return "\n".join(lines)


def _short_op(op: str) -> str:
    """Returns the short name of one operation; a user's own module class keeps its name."""
    base, _, details = op.partition("(")
    suffix = f"({details}" if details else ""
    if base[:1].isupper() and not hasattr(torch.nn, base):
        return op
    word = re.sub(r"[123]d$", "", base).lower()
    return _OP_ABBREVIATIONS.get(word, word) + suffix


def _dot_lines(text: str) -> str:
    """Returns ``text`` with its newlines as Graphviz's centred line breaks."""
    return text.replace("\n", "\\n")


# Cell-type diagrams.


def _cell_type_digraph(
    table: EdgeTable,
    cell_type: str,
    cells: list[str],
    cell_to_edges: dict[str, list[Edge]],
    title: str,
) -> graphviz.Digraph:
    """Builds the diagram of one cell type from the edges of all its cells."""
    cells = [cell for cell in cells if cell in cell_to_edges] or cells
    representative = cell_to_edges.get(cells[0], [])
    position_to_edges: dict[int, list[Edge]] = {}
    for cell in cells:
        for edge in cell_to_edges.get(cell, []):
            position_to_edges.setdefault(edge.position, []).append(edge)

    digraph = graphviz.Digraph(name=f"cell-{cell_type}")
    digraph.attr(rankdir="LR", fontname="Helvetica", fontsize="12", labelloc="t")
    digraph.attr("node", fontname="Helvetica", fontsize="12")
    digraph.attr("edge", fontname="Helvetica", fontsize="10")
    decided = any(edge.decision is not None for edge in table.edges)
    digraph.attr(label=_dot_lines(_cell_caption(table, cell_type, cells, title, decided)))

    name_to_label = _cell_node_labels(table, representative)
    for node_name, label in name_to_label.items():
        is_input = label.startswith("<c")
        digraph.node(
            node_name,
            label=label,
            shape="circle",
            style="filled" if is_input else "solid",
            fillcolor=_INPUT_FILL,
            tooltip=node_name,
        )
    for edge in representative:
        attributes = _position_arrow(position_to_edges.get(edge.position, [edge]))
        digraph.edge(edge.entry, edge.target, **attributes)
    return digraph


def _cell_caption(
    table: EdgeTable, cell_type: str, cells: list[str], title: str, decided: bool
) -> str:
    shown_cells = ", ".join(cell or "(root)" for cell in cells[:4])
    if len(cells) > 4:
        shown_cells += f" and {len(cells) - 4} more"
    count = f"{len(cells)} cell" + ("s" if len(cells) != 1 else "")
    lines = [
        title or table.model or "network",
        f"cell type {cell_type}: {count} ({shown_cells}), {table.scope} scope",
    ]
    lines.append(_LEGEND if decided else "supernet: every edge lists the options it admits")
    return "\n".join(lines)


def _cell_node_labels(table: EdgeTable, cell_edges: list[Edge]) -> dict[str, str]:
    """Returns NAS node name to its label in the cell diagram, as Graphviz HTML labels.

    The merges of the cell are numbered 0, 1, ... in graph order. The other entries, which
    no edge of the cell leads into, are the cell inputs: the last one in graph order is
    ``c_{k-1}``, the one before it ``c_{k-2}``, and so on.
    """
    name_to_order = {node.name: index for index, node in enumerate(table.nas_nodes)}
    first_use = {}
    for edge in cell_edges:
        first_use.setdefault(edge.entry, len(first_use))
        first_use.setdefault(edge.target, len(first_use))

    def order(name: str) -> tuple[int, int]:
        return (name_to_order.get(name, len(name_to_order)), first_use[name])

    merges = sorted({edge.target for edge in cell_edges}, key=order)
    inputs = sorted({edge.entry for edge in cell_edges} - set(merges), key=order)
    labels = {name: f"<c<SUB>k-{len(inputs) - index}</SUB>>" for index, name in enumerate(inputs)}
    labels.update({name: f"<{index}>" for index, name in enumerate(merges)})
    return labels


def _position_arrow(edges: list[Edge]) -> dict[str, str]:
    """Returns the Graphviz attributes of the arrow for one edge position of a cell type."""
    edge = edges[0]
    lines = ["new shortcut" if edge.shortcut else short_ops(edge.ops)]
    if all(other.decision is None for other in edges):
        lines.append("options: " + ", ".join(edge.options))
        attributes = {"label": _dot_lines("\n".join(lines)), "color": _BLACK, "fontcolor": _BLACK}
        if edge.shortcut:
            attributes["style"] = "dotted"
        return attributes

    lines.append(_decision_summary(edges))
    theta = _theta_summary(edges)
    if theta:
        lines.append(theta)
    guarded = sum(other.guarded for other in edges)
    if guarded:
        lines.append("kept by the guard" + _cell_count_suffix(guarded, len(edges)))

    styles = []
    if any(_is_removed(other) for other in edges):
        styles.append("dashed")
    elif edge.shortcut and not any(_is_changed(other) for other in edges):
        styles.append("dotted")
    if guarded:
        styles.append("bold")
    color = RED if any(_is_changed(other) for other in edges) else _BLACK
    attributes = {"label": _dot_lines("\n".join(lines)), "color": color, "fontcolor": color}
    if styles:
        attributes["style"] = ",".join(styles)
    return attributes


def _decision_summary(edges: list[Edge]) -> str:
    """Returns ``identity``, or ``same in 5, none in 2 of 7 cells (layers.1, layers.4)``.

    The cells are named for every option other than ``same`` that at most three cells chose.
    """
    decisions = [edge.decision for edge in edges]
    if len(set(decisions)) == 1:
        if len(decisions) > 1:
            return f"{decisions[0]} in all {len(decisions)} cells"
        return str(decisions[0])

    parts = []
    for option in (*OPTIONS, None):
        cells = [edge.cell or "(root)" for edge in edges if edge.decision == option]
        if not cells:
            continue
        part = f"{option or 'undecided'} in {len(cells)}"
        if option not in ("same", None) and len(cells) <= 3:
            part += f" ({', '.join(cells)})"
        parts.append(part)
    return ", ".join(parts) + f" of {len(decisions)} cells"


def _theta_summary(edges: list[Edge]) -> str:
    """Returns the theta values of an edge position, or their mean over cells that differ."""
    values = [edge.theta_values for edge in edges if edge.theta_values]
    if not values:
        return ""
    options = [option for option in OPTIONS if any(option in value for value in values)]
    option_to_mean = {
        option: sum(value.get(option, 0.0) for value in values) / len(values) for option in options
    }
    text = ", ".join(f"{option} {mean:.2f}" for option, mean in option_to_mean.items())
    same_everywhere = all(value == values[0] for value in values)
    return ("θ: " if same_everywhere else f"mean θ over {len(values)} cells: ") + text


def _cell_count_suffix(count: int, total: int) -> str:
    return "" if total == 1 else f" in {count} of {total} cells"


def _is_changed(edge: Edge) -> bool:
    """Returns True when derivation changed what the edge computes.

    A new shortcut starts as none, so for it only ``identity`` is a change.
    """
    if edge.shortcut:
        return edge.decision == "identity"
    return edge.changed


def _is_removed(edge: Edge) -> bool:
    """Returns True when derivation removed an operation that the original network had."""
    return edge.decision == "none" and not edge.shortcut


# Network diagrams.


class _NetworkDrawing:
    """Builds the whole-network diagram of one graph module and its edge table."""

    def __init__(self, graph_module: torch.fx.GraphModule, table: EdgeTable, name: str):
        self.graph_module = graph_module
        self.table = table
        self.name = name
        self.nodes = [node for node in graph_module.graph.nodes if node.op != "get_attr"]
        self.node_to_index = {node.name: index for index, node in enumerate(self.nodes)}
        self.arrows = {
            (source.name, node.name)
            for node in self.nodes
            for source in node.all_input_nodes
            if source.name in self.node_to_index
        }
        self.cell_to_type = {
            cell: cell_type
            for cell_type, cells in _cell_type_to_cells(table).items()
            for cell in cells
        }
        # Longest paths first, so that a node joins the innermost cell that contains it.
        self.cells = sorted((cell for cell in self.cell_to_type if cell), key=len, reverse=True)
        self.changed = [edge for edge in table.edges if _is_changed(edge)]
        self.node_to_edge = self._changed_edge_nodes()
        self.placeholders = self._placeholder_edges()
        self.empty_edge_arrows = {
            (edge.entry, edge.consumer): edge for edge in self.changed if edge.is_empty
        }

    def digraph(self) -> graphviz.Digraph:
        digraph = graphviz.Digraph(name=self.name)
        digraph.attr(
            rankdir="TB",
            fontname="Helvetica",
            fontsize="10",
            labelloc="t",
            nodesep="0.15",
            ranksep="0.2",
            label=_dot_lines(self._caption()),
        )
        digraph.attr(
            "node",
            shape="box",
            fontname="Helvetica",
            fontsize="8",
            height="0.2",
            margin="0.04,0.02",
        )
        digraph.attr("edge", arrowsize="0.5", penwidth="0.7", fontname="Helvetica", fontsize="7")

        cell_to_nodes = self._cell_to_nodes()
        self._add_nodes(digraph, "", cell_to_nodes)
        self._add_clusters(digraph, "", cell_to_nodes)
        self._add_arrows(digraph)
        return digraph

    def _caption(self) -> str:
        none_count = sum(edge.decision == "none" for edge in self.changed)
        lines = [f"{self.name}: {self.table.model or type(self.graph_module).__name__}"]
        if any(edge.decision is not None for edge in self.table.edges):
            lines.append(
                f"{len(self.changed)} of {len(self.table.edges)} edges changed "
                f"({len(self.changed) - none_count} identity, {none_count} none)"
            )
            lines.append(_LEGEND)
        else:
            lines.append(f"{len(self.table.edges)} edges, no decisions yet")
        return "\n".join(lines)

    def _changed_edge_nodes(self) -> dict[str, Edge]:
        """Returns node name to the changed edge it belongs to, mixed-edge nodes included."""
        id_to_edge = {edge.id: edge for edge in self.changed}
        node_to_edge = {}
        for edge in self.changed:
            for node_name in edge.nodes:
                if node_name in self.node_to_index:
                    node_to_edge[node_name] = edge
        for node in self.nodes:
            edge_id = node_info(node).get("mixed_edge")
            if edge_id in id_to_edge:
                node_to_edge[node.name] = id_to_edge[edge_id]
        return node_to_edge

    def _placeholder_edges(self) -> list[Edge]:
        """Returns the changed edges that left no node and no arrow in the graph."""
        ids_with_nodes = {edge.id for edge in self.node_to_edge.values()}
        return [
            edge
            for edge in self.changed
            if edge.id not in ids_with_nodes
            and not (edge.is_empty and (edge.entry, edge.consumer) in self.arrows)
        ]

    def _cell_of(self, module_path: str) -> str:
        for cell in self.cells:
            if module_path == cell or module_path.startswith(cell + "."):
                return cell
        return ""

    def _cell_to_nodes(self) -> dict[str, list[torch.fx.Node]]:
        cell_to_nodes: dict[str, list[torch.fx.Node]] = {}
        for node in self.nodes:
            cell = self._cell_of(node_info(node).get("module_path", ""))
            cell_to_nodes.setdefault(cell, []).append(node)
        return cell_to_nodes

    def _add_clusters(self, digraph, parent: str, cell_to_nodes) -> None:
        """Adds one cluster per cell directly inside ``parent``, with inner cells nested."""
        children = sorted(
            (cell for cell in self.cells if self._parent_cell(cell) == parent),
            key=lambda cell: self._first_index(cell, cell_to_nodes),
        )
        for cell in children:
            color = self._cell_color(cell)
            with digraph.subgraph(name=f"cluster_{_file_name(cell)}") as cluster:
                cluster.attr(
                    label=f"{cell} ({self.cell_to_type[cell]})",
                    color=color,
                    fontcolor=color,
                    style="rounded",
                    fontsize="9",
                )
                self._add_nodes(cluster, cell, cell_to_nodes)
                self._add_clusters(cluster, cell, cell_to_nodes)

    def _parent_cell(self, cell: str) -> str:
        parent = cell.rpartition(".")[0]
        while parent and parent not in self.cell_to_type:
            parent = parent.rpartition(".")[0]
        return parent

    def _first_index(self, cell: str, cell_to_nodes) -> int:
        nodes = cell_to_nodes.get(cell)
        return self.node_to_index[nodes[0].name] if nodes else len(self.nodes)

    def _cell_color(self, cell: str) -> str:
        return RED if any(edge.cell == cell for edge in self.changed) else _CLUSTER_BORDER

    def _add_nodes(self, digraph, cell: str, cell_to_nodes) -> None:
        """Adds the nodes of ``cell`` that no inner cell contains, and its placeholders."""
        for node in cell_to_nodes.get(cell, []):
            attributes = {"label": self._node_label(node), "tooltip": node.name}
            if node.op in ("placeholder", "output"):
                attributes.update(shape="ellipse", style="filled", fillcolor=_INPUT_FILL)
            edge = self.node_to_edge.get(node.name)
            if edge is not None:
                attributes.update(_changed_style(edge))
            digraph.node(node.name, **attributes)

        for edge in self.placeholders:
            if self._cell_of(edge.cell) == cell:
                label = f"{edge.name}: {short_ops(edge.ops)}\n→ {edge.decision}"
                digraph.node(
                    _placeholder_name(edge),
                    label=_dot_lines(label),
                    tooltip=f"{edge.name} has no node left in this graph",
                    **_changed_style(edge),
                )

    def _node_label(self, node: torch.fx.Node) -> str:
        info = node_info(node)
        if node.op == "placeholder":
            return node.name
        if node.op == "output":
            return "output"
        if "mixed_edge" in info:
            edge_name = f"e{info['mixed_edge']}"
            return f"{edge_name} mixed" if node.op == "call_module" else f"{edge_name} θ·x"
        return _short_op(op_label(node, self.graph_module))

    def _add_arrows(self, digraph) -> None:
        for node in self.nodes:
            for source in dict.fromkeys(node.all_input_nodes):
                if source.name not in self.node_to_index:
                    continue
                edge = self._arrow_edge(source.name, node.name)
                if edge is None:
                    digraph.edge(source.name, node.name)
                    continue
                attributes = _changed_style(edge)
                if node.name in (edge.consumer, edge.target):
                    attributes["xlabel"] = f"{edge.name} {edge.decision}"
                digraph.edge(source.name, node.name, **attributes)

        for edge in self.placeholders:
            if edge.entry in self.node_to_index:
                digraph.edge(edge.entry, _placeholder_name(edge), **_changed_style(edge))
            if edge.target in self.node_to_index:
                digraph.edge(_placeholder_name(edge), edge.target, **_changed_style(edge))

    def _arrow_edge(self, source: str, target: str) -> Edge | None:
        """Returns the changed edge that the arrow from ``source`` to ``target`` runs along."""
        edge = self.node_to_edge.get(target)
        if edge is not None and (self.node_to_edge.get(source) is edge or source == edge.entry):
            return edge
        edge = self.node_to_edge.get(source)
        if edge is not None and target in (edge.consumer, edge.target):
            return edge
        # An empty edge of a graph without mixed edges is the arrow from its entry to its merge.
        return self.empty_edge_arrows.get((source, target))


def _placeholder_name(edge: Edge) -> str:
    return f"fxadapt_removed_{edge.name}"


def _changed_style(edge: Edge) -> dict[str, str]:
    attributes = {"color": RED, "fontcolor": RED}
    if _is_removed(edge):
        attributes["style"] = "dashed"
    return attributes
