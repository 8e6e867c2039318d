"""Tracing any model into a GraphModule, with submodules that cannot be traced kept as leaves.

``trace`` runs torch.fx's symbolic tracer. When a submodule's ``forward`` cannot be traced
(data-dependent control flow, ``len`` of a proxy, an integer cast of a shape), the nodes it
had emitted are removed, the submodule becomes a leaf (one ``call_module`` node) and tracing
goes on. Because the tracer enters submodules depth first, the smallest submodule that fails
is the one that becomes a leaf. Every node records the path of the module it came from in
``node.meta["fxadapt"]["module_path"]``.
"""

from __future__ import annotations

import collections
import copy
import logging
import operator
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from fxadapt.errors import TraceError

__all__ = ["TraceResult", "trace", "propagate_shapes", "node_info", "clone_graph_module"]

logger = logging.getLogger(__name__)


@dataclass
class TraceResult:
    """A traced model and what tracing had to give up on.

    Attributes:
        graph_module: the traced model.
        leaves: module path to the reason the module was kept as a leaf. Modules that are
            leaves by default (the layers of ``torch.nn``) are not listed.
    """

    graph_module: torch.fx.GraphModule
    leaves: dict[str, str] = field(default_factory=dict)


class _FallbackTracer(torch.fx.Tracer):
    """A tracer that turns submodules it cannot trace into leaves instead of failing."""

    def __init__(self, leaf_types: tuple[type, ...] = ()):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_reasons: dict[str, str] = {}
        self.attribute_proxies: dict[str, torch.fx.Proxy] = {}

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_reasons:
            return True
        if self.leaf_types and isinstance(module, self.leaf_types):
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        qualified_name = self.path_of_module(module)
        if qualified_name == "" or self.is_leaf_module(module, qualified_name):
            return super().call_module(module, forward, args, kwargs)

        last_node = self.graph._root.prev
        module_stack = collections.OrderedDict(self.module_stack)
        num_calls = dict(self.num_calls)
        try:
            return super().call_module(module, forward, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any failure inside forward makes a leaf
            self._erase_after(last_node)
            self.module_stack = module_stack
            self.num_calls = num_calls
            self.leaf_reasons[qualified_name] = _short_reason(err)
            logger.info("kept %s as a leaf: %s", qualified_name, self.leaf_reasons[qualified_name])
            return super().call_module(module, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        # The tracer's own cache is local to ``trace``; ours can drop the proxies whose nodes
        # a failed submodule left behind.
        return super().getattr(attr, attr_val, self.attribute_proxies)

    def _erase_after(self, last_node: torch.fx.Node) -> None:
        """Removes the nodes emitted after ``last_node``, newest first."""
        erased = set()
        while self.graph._root.prev is not last_node:
            node = self.graph._root.prev
            erased.add(node)
            self.graph.erase_node(node)
        for name, proxy in list(self.attribute_proxies.items()):
            if proxy.node in erased:
                del self.attribute_proxies[name]


def trace(
    model: torch.nn.Module,
    *,
    leaf_types: Iterable[type] = (),
    concrete_args: dict | None = None,
) -> TraceResult:
    """Traces ``model`` into a GraphModule, keeping untraceable submodules as leaves.

    The model is not changed. The GraphModule shares the model's submodules; copy the model
    first when the two must not share weights.

    Args:
        model: the module to trace.
        leaf_types: module classes to keep as leaves without trying to trace them.
        concrete_args: arguments of ``model.forward`` to fix to a value while tracing, as in
            ``torch.fx.symbolic_trace``.

    Returns:
        The GraphModule and the leaves tracing had to introduce.

    Raises:
        TraceError: when the root module's own ``forward`` cannot be traced.
    """
    tracer = _FallbackTracer(tuple(leaf_types))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        raise TraceError(_root_failure_message(model, err)) from err

    graph_module = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    _record_module_paths(graph_module)
    _drop_zero_adds(graph_module)
    for path, reason in tracer.leaf_reasons.items():
        logger.info("leaf %s: %s", path, reason)
    return TraceResult(graph_module, dict(tracer.leaf_reasons))


def propagate_shapes(graph_module: torch.fx.GraphModule, example_input: torch.Tensor) -> None:
    """Records the shape and dtype of every node in ``node.meta["tensor_meta"]``.

    The module runs once in eval mode on ``example_input`` so that batch statistics and
    running averages are left as they were.

    Raises:
        TraceError: when the model does not accept the example input.
    """
    was_training = graph_module.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    except Exception as err:
        shape = tuple(example_input.shape)
        raise TraceError(
            f"the model failed on an example input of shape {shape}: {_short_reason(err)}; "
            "check that the data fits the model (input channels, image size, classes)"
        ) from err
    finally:
        graph_module.train(was_training)


def node_info(node: torch.fx.Node) -> dict:
    """Returns the fxadapt facts recorded on ``node`` (an empty dict when there are none)."""
    return node.meta.get("fxadapt", {})


def _record_module_paths(graph_module: torch.fx.GraphModule) -> None:
    """Records, for every node, the path and class of the module whose forward emitted it."""
    root_type = type(graph_module).__name__
    for node in graph_module.graph.nodes:
        frames = list((node.meta.get("nn_module_stack") or {}).values())
        if node.op == "call_module":
            # The tracer pushes a leaf onto the stack before emitting its node; the module
            # that emitted the call is the one below it.
            frames = frames[:-1]
        if frames:
            path, module_type = frames[-1]
            type_name = getattr(module_type, "__name__", str(module_type))
        else:
            path, type_name = "", root_type
        node.meta["fxadapt"] = {"module_path": path, "module_type": type_name}


def _drop_zero_adds(graph_module: torch.fx.GraphModule) -> None:
    """Replaces ``0 + x`` (what Python's ``sum`` of tensors starts with) by ``x``."""
    graph = graph_module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (operator.add, torch.add):
            continue
        if len(node.args) != 2 or node.kwargs:
            continue
        left, right = node.args
        if isinstance(left, (int, float)) and left == 0 and isinstance(right, torch.fx.Node):
            node.replace_all_uses_with(right)
        elif isinstance(right, (int, float)) and right == 0 and isinstance(left, torch.fx.Node):
            node.replace_all_uses_with(left)
        else:
            continue
        graph.erase_node(node)
        changed = True
    if changed:
        graph.lint()
        graph_module.recompile()


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _root_failure_message(model: torch.nn.Module, err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    torch_dir = str(Path(torch.__file__).parent)
    own_dir = str(Path(__file__).parent)
    user_frames = [
        frame
        for frame in frames
        if not frame.filename.startswith((torch_dir, own_dir)) and "<" not in frame.filename
    ]
    where = ""
    if user_frames:
        frame = user_frames[-1]
        where = f" at {frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return (
        f"torch.fx cannot trace {type(model).__name__}.forward{where}: {_short_reason(err)}; "
        "make that line independent of tensor values, or pass the arguments it depends on "
        "as concrete arguments"
    )


def clone_graph_module(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Returns a deep copy of ``graph_module`` whose nodes keep their meta."""
    return copy.deepcopy(graph_module)
