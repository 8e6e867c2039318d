"""Backbone: cut a traced model at its features, so that the graph outputs them.

Takes a traced GraphModule (from ``fxadapt.tracing.trace`` or ``torch.fx.symbolic_trace``)
and returns a new GraphModule whose only output is the feature node. The pass runs before
``wrap``, so it takes no edge table. By default the feature node is the input of the final
classifier layer, which is the argument of the last ``nn.Linear`` call in graph order. A
caller may name another node. Everything the new output does not depend on is removed,
modules included, so a classifier and an auxiliary head leave no weights behind. Nodes keep
their meta, so module paths survive the cut.

``fxadapt.wrap`` keeps the graph of a GraphModule that ``trace`` made, so a wrapped backbone
finds the same cells as the whole model.

Before (the last ``nn.Linear`` is ``fc``)::

    x ──▶ ... ──▶ avgpool ──▶ flatten ──▶ fc ──▶ output

After::

    x ──▶ ... ──▶ avgpool ──▶ flatten ──▶ output
"""

from __future__ import annotations

import copy
import logging

import torch.fx
from torch import nn

from fxadapt.errors import FxadaptError

__all__ = ["FeatureNodeError", "cut_backbone", "find_classifier_input"]

logger = logging.getLogger(__name__)

# How many node names an error lists as examples of valid feature nodes.
_CANDIDATES_SHOWN = 6


class FeatureNodeError(FxadaptError, ValueError):
    """The features of a model cannot be located: no ``nn.Linear``, or an unknown node."""


def cut_backbone(
    graph_module: torch.fx.GraphModule, feature_node: str | None = None
) -> torch.fx.GraphModule:
    """Returns a copy of ``graph_module`` that outputs its features instead of its outputs.

    Args:
        graph_module: a traced model. It is not changed.
        feature_node: name of the node whose value becomes the only output, or None for the
            input of the last ``nn.Linear`` call in graph order.

    Returns:
        The new GraphModule, without the nodes and modules that its output does not use.

    Raises:
        FeatureNodeError: when ``feature_node`` names no node of the graph, names the graph's
            output or an input, or when it is None and the graph calls no ``nn.Linear``.
    """
    source = copy.deepcopy(graph_module)
    graph = source.graph
    if feature_node is None:
        features = find_classifier_input(source)
    else:
        features = _named_node(graph, feature_node)

    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    output.args = (features,)
    graph.eliminate_dead_code()
    # A new GraphModule copies only the modules the graph still calls, and keeps the class
    # name that a deep copy alone would reset to GraphModule.
    result = torch.fx.GraphModule(source, graph, type(graph_module).__name__)
    result.graph.lint()
    result.recompile()
    logger.info("cut the graph at node %s", features.name)
    return result


def find_classifier_input(graph_module: torch.fx.GraphModule) -> torch.fx.Node:
    """Returns the node that feeds the last ``nn.Linear`` call of ``graph_module``.

    Raises:
        FeatureNodeError: when the graph calls no ``nn.Linear`` or its input is not a node.
    """
    linear_calls = [
        node
        for node in graph_module.graph.nodes
        if node.op == "call_module"
        and isinstance(graph_module.get_submodule(node.target), nn.Linear)
    ]
    if not linear_calls:
        raise FeatureNodeError(
            f"{_model_name(graph_module)} calls no nn.Linear, so its classifier input cannot "
            f"be found: name the feature node with --feature-node, for example "
            f"{_candidates(graph_module.graph)}"
        )
    classifier = linear_calls[-1]
    features = classifier.args[0] if classifier.args else classifier.kwargs.get("input")
    if not isinstance(features, torch.fx.Node):
        raise FeatureNodeError(
            f"the input of the classifier {classifier.target} is not a graph value: name the "
            f"feature node with --feature-node, for example {_candidates(graph_module.graph)}"
        )
    return features


def _named_node(graph: torch.fx.Graph, name: str) -> torch.fx.Node:
    name_to_node = {node.name: node for node in graph.nodes}
    node = name_to_node.get(name)
    if node is None:
        raise FeatureNodeError(
            f"feature node {name!r} not found in the traced graph: use a node name such as "
            f"{_candidates(graph)}"
        )
    if node.op in ("output", "placeholder"):
        raise FeatureNodeError(
            f"feature node {name!r} is the graph's {node.op}, not an intermediate value: use "
            f"a node name such as {_candidates(graph)}"
        )
    return node


def _candidates(graph: torch.fx.Graph) -> str:
    """Returns the names of the last computed nodes, the likeliest places for features."""
    computed = [
        node.name
        for node in graph.nodes
        if node.op in ("call_module", "call_function", "call_method")
    ]
    last_names = computed[-_CANDIDATES_SHOWN:]
    return ", ".join(last_names) if last_names else "(the graph computes nothing)"


def _model_name(graph_module: torch.fx.GraphModule) -> str:
    return type(graph_module).__name__
