"""The edge table: plain data about every edge that the passes, trainer, report and drawer read.

The table is written as ``edges.json`` in every run directory. Everything in it is made of
strings, numbers, lists and dicts, so it can be read back without fxadapt's classes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OPTIONS", "Edge", "NasNode", "EdgeTable"]

# Options in the order that decides ties: the more conservative option wins.
OPTIONS = ("same", "identity", "none")


@dataclass
class NasNode:
    """A node of the NAS graph: a graph input, a fork, a merge or a graph output.

    Attributes:
        name: name of the torch.fx node.
        kind: ``input``, ``fork``, ``merge`` or ``output``.
        cell: module path of the cell the node belongs to ("" for the root module).
        shape: tensor shape propagated from the example input, or an empty list.
        inputs: for a merge, how many values it adds; 0 for other kinds.
    """

    name: str
    kind: str
    cell: str = ""
    shape: list[int] = field(default_factory=list)
    inputs: int = 0


@dataclass
class Edge:
    """One adaptable edge and, once derived, the option it keeps.

    Attributes:
        id: position of the edge in the table, in graph order.
        cell: module path of the cell that holds the edge's merge ("" for the root module).
        cell_type: name of the cell type, shared by structurally identical cells.
        position: index of the edge among the edges of its cell.
        entry: name of the NAS node whose value the edge reads.
        exit: name of the last node of the edge's operation (the entry for an empty chain).
        merge: name of the additive merge the edge feeds, or "" for a layer edge (at layer
            granularity) whose value goes on to every user of its exit.
        consumer: name of the add node that reads the edge's value: the merge itself, or one
            of the inner adds that a merge of more than two inputs is made of; "" for a layer
            edge.
        consumer_arg: position of the edge's value among the consumer's arguments; -1 for a
            layer edge or a new shortcut, which the merge does not read yet.
        nodes: names of the nodes that make up the edge's operation, in graph order.
        ops: a short label for each operation along the edge, in graph order.
        options: the options the edge admits, a subset of ``OPTIONS`` in that order.
        theta: name of the mixed-edge module that holds the edge's theta; edges that share
            theta (cell scope) share this name.
        input_shape: shape of the entry value.
        output_shape: shape of the exit value.
        shortcut: True for a placeholder edge whose original operation is none.
        decision: the option kept after derivation, or None before it.
        theta_values: theta per option at derivation.
        guarded: True when the guard overrode a none decision to keep the merge alive.
    """

    id: int
    cell: str
    cell_type: str
    position: int
    entry: str
    exit: str
    merge: str
    consumer: str
    consumer_arg: int
    nodes: list[str]
    ops: list[str]
    options: list[str]
    theta: str
    input_shape: list[int] = field(default_factory=list)
    output_shape: list[int] = field(default_factory=list)
    shortcut: bool = False
    decision: str | None = None
    theta_values: dict[str, float] | None = None
    guarded: bool = False

    @property
    def name(self) -> str:
        """Returns the short name used in logs, reports and diagrams, such as ``e3``."""
        return f"e{self.id}"

    @property
    def target(self) -> str:
        """Returns the node the edge ends at: its merge, or its exit for a layer edge."""
        return self.merge or self.exit

    @property
    def is_empty(self) -> bool:
        """Returns True when the edge has no operation: it already is an identity."""
        return not self.nodes

    @property
    def original(self) -> str:
        """Returns the option that computes what the model computed: none for a new shortcut."""
        return "none" if self.shortcut else "same"

    @property
    def changed(self) -> bool:
        """Returns True when the edge was derived into something other than its original op."""
        return self.decision is not None and self.decision != self.original


@dataclass
class EdgeTable:
    """All edges of one traced model, with the facts about the graph they come from.

    Attributes:
        edges: the adaptable edges, in graph order.
        nas_nodes: the NAS nodes of the graph, in graph order.
        cell_types: cell type name to the module paths of the cells of that type.
        leaves: module path to the reason it was traced as a leaf.
        granularity: ``branch`` or ``layer``.
        scope: ``full`` or ``cell``.
        model: the model specification or class name the table was made from.
    """

    edges: list[Edge] = field(default_factory=list)
    nas_nodes: list[NasNode] = field(default_factory=list)
    cell_types: dict[str, list[str]] = field(default_factory=dict)
    leaves: dict[str, str] = field(default_factory=dict)
    granularity: str = "branch"
    scope: str = "full"
    model: str = ""

    def __len__(self) -> int:
        return len(self.edges)

    def __iter__(self):
        return iter(self.edges)

    def theta_groups(self) -> dict[str, list[Edge]]:
        """Returns theta group name to the edges that share it, in graph order."""
        theta_to_edges: dict[str, list[Edge]] = {}
        for edge in self.edges:
            theta_to_edges.setdefault(edge.theta, []).append(edge)
        return theta_to_edges

    def decisions(self) -> dict[int, str | None]:
        """Returns edge id to decision."""
        return {edge.id: edge.decision for edge in self.edges}

    def to_dict(self) -> dict:
        """Returns the table as plain data."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EdgeTable:
        """Builds a table from the plain data that ``to_dict`` returns."""
        fields = dict(data)
        fields["edges"] = [Edge(**edge) for edge in data.get("edges", [])]
        fields["nas_nodes"] = [NasNode(**node) for node in data.get("nas_nodes", [])]
        return cls(**fields)

    def save(self, path: str | Path) -> None:
        """Writes the table as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EdgeTable:
        """Reads a table that ``save`` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text()))
