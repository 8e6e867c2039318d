"""The Python API: wrap a model, train it with your own loop, derive it and export it.

wrapped = fxadapt.wrap(model, example_input)
weights = torch.optim.SGD(fxadapt.weight_parameters(wrapped), lr=0.025, momentum=0.9)
thetas = torch.optim.Adam(fxadapt.arch_parameters(wrapped), lr=1e-3)
...  # for every batch: a step of weights, then a step of thetas on the same batch
derived = fxadapt.derive(wrapped)
fxadapt.export(derived, "model.ts", example_input)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

from fxadapt.analysis import analyse
from fxadapt.edges import EdgeTable
from fxadapt.errors import TraceError
from fxadapt.passes import MIXED_ROOT, decide, fuse_mixed_edges, insert_mixed_edges
from fxadapt.passes import derive as derive_pass
from fxadapt.tracing import propagate_shapes, trace

__all__ = ["wrap", "edge_table", "arch_parameters", "weight_parameters", "derive", "is_wrapped"]

logger = logging.getLogger(__name__)

_META_KEY = "fxadapt"


def wrap(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    granularity: str = "branch",
    scope: str = "full",
    shortcuts: bool = False,
    leaf_types: Iterable[type] = (),
    concrete_args: dict | None = None,
    name: str = "",
) -> torch.fx.GraphModule:
    """Traces ``model`` and turns its adaptable edges into mixed edges.

    The model is copied first, so the wrapped module trains its own weights. At
    initialisation it computes exactly what ``model`` computes.

    Args:
        model: the network to adapt.
        example_input: a batch the model accepts, used to propagate shapes; two or more
            samples, so that BatchNorm accepts it.
        granularity: ``branch`` (the default) or ``layer``.
        scope: ``full`` (a theta per edge, the default) or ``cell``.
        shortcuts: add placeholder edges, none at first, that training can turn into new
            skip connections.
        leaf_types: module classes to keep as leaves instead of tracing through them.
        concrete_args: arguments of ``forward`` to fix while tracing.
        name: the model's name or specification, kept in the edge table.

    Returns:
        The wrapped GraphModule. Its edge table is ``fxadapt.edge_table(wrapped)``.

    Raises:
        TraceError: when the model cannot be traced, does not accept the example input or
            has no adaptable edge.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    traced = trace(copy.deepcopy(model), leaf_types=leaf_types, concrete_args=concrete_args)
    propagate_shapes(traced.graph_module, example_input)
    table = analyse(
        traced.graph_module,
        granularity=granularity,
        scope=scope,
        shortcuts=shortcuts,
        leaves=traced.leaves,
        model=name or type(model).__name__,
    )
    if not table.edges:
        raise TraceError(_no_edge_message(type(model).__name__, granularity))
    wrapped = insert_mixed_edges(traced.graph_module, table)
    wrapped.train(model.training)
    wrapped.meta[_META_KEY] = {"edge_table": table}
    logger.info(
        "wrapped %s: %d edges in %d theta groups, %d leaves",
        table.model,
        len(table.edges),
        len(table.theta_groups()),
        len(table.leaves),
    )
    return wrapped


def is_wrapped(module: nn.Module) -> bool:
    """Returns True when ``module`` holds mixed edges."""
    return isinstance(module, torch.fx.GraphModule) and hasattr(module, MIXED_ROOT)


def edge_table(module: torch.fx.GraphModule) -> EdgeTable:
    """Returns the edge table of a wrapped or derived module.

    Raises:
        TypeError: when the module did not come from ``wrap`` or ``derive``.
    """
    meta = getattr(module, "meta", {}).get(_META_KEY)
    if not meta:
        raise TypeError("the module has no edge table: pass a module from fxadapt.wrap")
    return meta["edge_table"]


def arch_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Returns the architecture parameters (theta) of a wrapped module."""
    _check_wrapped(module)
    return list(getattr(module, MIXED_ROOT).parameters())


def weight_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Returns the weights of a wrapped module: every parameter that is not a theta."""
    _check_wrapped(module)
    thetas = {id(parameter) for parameter in arch_parameters(module)}
    return [parameter for parameter in module.parameters() if id(parameter) not in thetas]


def fuse(wrapped: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Returns a faster module for training ``wrapped``, sharing all its weights and theta.

    Each merge of mixed edges runs as one pass over its tensors, and ``theta_same`` of an
    edge that ends in BatchNorm scales that layer's affine weights instead of its output
    (see ``fxadapt.passes.fuse``). Train the fused module and derive, save or draw
    ``wrapped``: they hold the same parameters, but only ``wrapped`` keeps the mixed edges
    in its graph.

    Raises:
        TypeError: when the module did not come from ``wrap``.
    """
    _check_wrapped(wrapped)
    if getattr(wrapped, "meta", {}).get(_META_KEY, {}).get("fused"):
        raise TypeError("the module is fused already: pass the module from fxadapt.wrap")
    fused = fuse_mixed_edges(wrapped)
    fused.meta[_META_KEY] = {**wrapped.meta[_META_KEY], "fused": True}
    return fused


def derive(
    wrapped: torch.fx.GraphModule, decisions: dict[int, str] | None = None
) -> torch.fx.GraphModule:
    """Returns the derived module: each edge keeps only its chosen option.

    Args:
        wrapped: a module from ``wrap``, usually trained. It is not changed.
        decisions: edge id to option, to apply instead of deciding from theta (for example
            the decisions saved in a checkpoint).

    Returns:
        A plain GraphModule with no theta, in the training mode of ``wrapped``. Its edge
        table, with the decisions, is ``fxadapt.edge_table(derived)``.
    """
    _check_wrapped(wrapped)
    if wrapped.meta[_META_KEY].get("fused"):
        raise TypeError(
            "a fused module has no mixed edges in its graph: derive the module from "
            "fxadapt.wrap that fxadapt.fuse was given"
        )
    table = decide(wrapped, edge_table(wrapped), decisions)
    derived = derive_pass(wrapped, table)
    derived.meta[_META_KEY] = {"edge_table": table}
    changed = [edge for edge in table.edges if edge.changed]
    logger.info(
        "derived: %d of %d edges changed (%d none, %d identity)",
        len(changed),
        len(table.edges),
        sum(edge.decision == "none" for edge in changed),
        sum(edge.decision == "identity" for edge in changed),
    )
    return derived


def _check_wrapped(module: nn.Module) -> None:
    if not is_wrapped(module):
        raise TypeError("the module holds no mixed edges: pass a module from fxadapt.wrap")


def _no_edge_message(class_name: str, granularity: str) -> str:
    """Says why a model has no adaptable edge at ``granularity`` and what to try instead."""
    merges = (
        "no additive merge (a residual add or a sum of branches) whose inputs depend on the "
        "model input"
    )
    if granularity == "layer":
        return (
            f"{class_name} has no adaptable edge at layer granularity: its graph has {merges}, "
            "and no conv or linear layer keeps the shape of its input, so no edge can become "
            "identity or none; adapt a model with residual connections or such layers"
        )
    return (
        f"{class_name} has no adaptable edge at branch granularity: its graph has {merges}; "
        "try --granularity layer, which also adapts conv and linear layers that keep the "
        "shape of their input, or adapt a model with residual connections"
    )
