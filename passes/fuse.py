"""Fuse: the graph the trainer runs, with each merge of mixed edges computed in one pass.

Takes a wrapped GraphModule (from ``insert``) and returns a new GraphModule that computes the
same values, up to floating-point rounding, and shares every parameter, buffer and
submodule with it. Training the fused module trains the wrapped one; derivation, diagrams
and checkpoints keep working on the wrapped module, whose graph is unchanged.

Two rewrites, each applied where it is exact:

- A mixed edge whose operation ends in an affine BatchNorm that only this edge reads takes
  ``theta_same`` into that BatchNorm's weight and bias (``ScaledBatchNorm``).
- An add whose operands include mixed edges read by this add alone becomes one
  ``MixedSum`` of every tensor involved. Terms on the same tensor, such as an edge's
  identity option and a shortcut from the same NAS node, share one coefficient. Where the
  term with coefficient 1 is the output of a ``ScaledBatchNorm``, the sum adds into it in
  place, as the derived module's ``add_`` does.

Before, for a ResNet block whose branch ``o`` ends in BatchNorm ``bn``::

    x ──o──▶ bn ──▶ mixed_e0(x, ·) ──▶ add ◀── mixed_e1(x, x) ◀── x

After (4 passes over the block's output become 1)::

    x ──o──▶ ScaledBatchNorm(bn, theta_same[e0]) ──▶ MixedSum ◀── x
                                  coefficients (1, theta_identity[e0] + theta_same[e1]),
                                  added into the ScaledBatchNorm's output

Last, the ReLUs of the fused graph work in place where their input is a new tensor that
nothing else reads, as the derived module's do (``fxadapt.passes.inplace``). Neither
``ScaledBatchNorm`` nor ``MixedSum`` reads its output in the backward pass.

Mixed edges that match neither pattern (an in-place add, an add with ``alpha``, an edge read
by several nodes, operands of different shapes) stay as they are.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.fx
from torch import nn

from fxadapt.fused import NORM_TYPES, MixedSum, ScaledBatchNorm, Term
from fxadapt.mixed import MixedEdge
from fxadapt.passes.inplace import rewrite_inplace
from fxadapt.passes.insert import MIXED_ROOT
from fxadapt.passes.nodes import IN_PLACE_ADDS, add_operands, tensor_type
from fxadapt.tracing import node_info

__all__ = ["FUSED_ROOT", "fuse_mixed_edges"]

logger = logging.getLogger(__name__)

# Name of the submodule of a fused GraphModule that contains its fused modules.
FUSED_ROOT = "fxadapt_fused"


def fuse_mixed_edges(wrapped: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Returns a module that computes what ``wrapped`` computes with its merges fused.

    Args:
        wrapped: a module from ``fxadapt.wrap``. It is not changed.

    Returns:
        A GraphModule that shares its parameters, buffers and submodules with ``wrapped``.
        Save and derive ``wrapped``: the fused module's state dict has other keys.

    Raises:
        ValueError: when ``wrapped`` has no mixed edges.
    """
    mixed_root = getattr(wrapped, MIXED_ROOT, None)
    if mixed_root is None:
        raise ValueError("the module has no mixed edges: pass a module from fxadapt.wrap")
    graph = copy.deepcopy(wrapped.graph)
    fuser = _Fuser(wrapped, graph, mixed_root)
    fuser.run()

    root = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            if node.target in fuser.new_modules:
                root[node.target] = fuser.new_modules[node.target]
            else:
                root[node.target] = _attribute(wrapped, node.target)
    graph.lint()
    fused = torch.fx.GraphModule(root, graph, class_name=type(wrapped).__name__)
    # Theta keep the names they have in the wrapped module, so that DDP can leave them out
    # by name and optimizers built on either module see the same parameters.
    fused.add_module(MIXED_ROOT, mixed_root)
    fused.train(wrapped.training)
    rewrite_inplace(fused)
    fused.recompile()
    logger.debug("fused %d merges and %d BatchNorm layers", fuser.merges_fused, fuser.norms_scaled)
    return fused


def _attribute(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


class _Fuser:
    """Rewrites one graph in place. ``new_modules`` receives the modules it adds."""

    def __init__(self, wrapped: torch.fx.GraphModule, graph: torch.fx.Graph, mixed_root):
        self.wrapped = wrapped
        self.graph = graph
        self.mixed_root = mixed_root
        self.new_modules: dict[str, nn.Module] = {}
        self.merges_fused = 0
        self.norms_scaled = 0

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.graph is self.graph and node.target not in IN_PLACE_ADDS and add_operands(node):
                self._fuse_merge(node)
        for node in list(self.graph.nodes):
            if self._mixed_edge(node) is not None:
                self._fuse_alone(node)

    def _mixed_edge(self, node: torch.fx.Node) -> MixedEdge | None:
        if node.op != "call_module" or "mixed_edge" not in node_info(node):
            return None
        return self.mixed_root[node.target.split(".", 1)[1]]

    def _fuse_merge(self, merge: torch.fx.Node) -> None:
        operands = add_operands(merge)
        mixed_operands = [
            operand
            for operand in operands
            if self._mixed_edge(operand) is not None and len(operand.users) == 1
        ]
        if not mixed_operands or len(set(operands)) != len(operands):
            return
        terms: list[tuple[torch.fx.Node, Term]] = []
        norms = []
        for operand in operands:
            if operand in mixed_operands:
                edge_terms, edge_norms = self._edge_terms(operand)
                terms += edge_terms
                norms += edge_norms
            else:
                terms.append((operand, Term(1.0)))
        merge_type = tensor_type(merge)
        if merge_type is None or any(tensor_type(node) != merge_type for node, _ in terms):
            return

        for mixed_node in norms:
            self._scale_norm(mixed_node)
        self._replace_with_sum(merge, terms)
        for operand in mixed_operands:
            self.graph.erase_node(operand)
        self.merges_fused += 1

    def _fuse_alone(self, mixed_node: torch.fx.Node) -> None:
        """Fuses a mixed edge whose output goes elsewhere than into one add."""
        if not self._scalable_norm(mixed_node):
            return
        terms, norms = self._edge_terms(mixed_node)
        for node in norms:
            self._scale_norm(node)
        if len(terms) == 1:
            # theta_same is in the BatchNorm now, and the edge has no other option.
            mixed_node.replace_all_uses_with(terms[0][0])
            self.graph.erase_node(mixed_node)
        else:
            self._replace_with_sum(mixed_node, terms)

    def _edge_terms(self, mixed_node) -> tuple[list[tuple[torch.fx.Node, Term]], list]:
        """Returns the terms of one mixed edge and the mixed nodes whose BatchNorm to scale.

        A term on a BatchNorm output assumes that ``_scale_norm`` is called for its mixed node
        before the terms are used. Nothing in the graph changes here.
        """
        mixed = self._mixed_edge(mixed_node)
        group = mixed_node.target.split(".", 1)[1]
        entry, out = mixed_node.args
        terms = []
        norms = []
        if mixed.has_same:
            if self._scalable_norm(mixed_node):
                norms.append(mixed_node)
                terms.append((out, Term(1.0)))
            else:
                terms.append((out, Term(0.0, ((group, "same"),))))
        if mixed.has_identity:
            terms.append((entry, Term(0.0, ((group, "identity"),))))
        return terms, norms

    def _scalable_norm(self, mixed_node: torch.fx.Node) -> bool:
        mixed = self._mixed_edge(mixed_node)
        entry, out = mixed_node.args
        if not mixed.has_same or out is entry or out.op != "call_module":
            return False
        if len(out.users) != 1 or _is_fused_target(out.target):
            return False
        norm = _attribute(self.wrapped, out.target)
        return type(norm) in NORM_TYPES and norm.affine

    def _scale_norm(self, mixed_node: torch.fx.Node) -> None:
        """Points the BatchNorm call that feeds ``mixed_node`` at a ScaledBatchNorm."""
        mixed = self._mixed_edge(mixed_node)
        out = mixed_node.args[1]
        target = f"{FUSED_ROOT}.norm_{len(self.new_modules)}"
        self.new_modules[target] = ScaledBatchNorm(_attribute(self.wrapped, out.target), mixed)
        out.target = target
        self.norms_scaled += 1

    def _is_scaled_norm(self, node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(
            self.new_modules.get(node.target), ScaledBatchNorm
        )

    def _replace_with_sum(self, node: torch.fx.Node, terms) -> None:
        node_to_term: dict[torch.fx.Node, Term] = {}
        for value, term in terms:
            if value in node_to_term:
                previous = node_to_term[value]
                term = Term(previous.constant + term.constant, previous.thetas + term.thetas)
            node_to_term[value] = term
        # The sum may add into the first term's tensor when that is a scaled BatchNorm's
        # output: the fused edge was its only reader, and BatchNorm's backward never reads it.
        first = next((value for value, term in node_to_term.items() if term.is_one), None)
        in_place = len(node_to_term) > 1 and first is not None and self._is_scaled_norm(first)
        target = f"{FUSED_ROOT}.sum_{len(self.new_modules)}"
        self.new_modules[target] = MixedSum(
            list(node_to_term.values()), self.mixed_root, in_place=in_place
        )
        node.op, node.target = "call_module", target
        node.args, node.kwargs = tuple(node_to_term), {}


def _is_fused_target(target: str) -> bool:
    return target.startswith(f"{FUSED_ROOT}.")
