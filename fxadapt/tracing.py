"""Tracing any model into a GraphModule, with submodules that cannot be traced kept as leaves.

``trace`` runs torch.fx's symbolic tracer. When a submodule's ``forward`` cannot be traced
(data-dependent control flow, ``len`` of a proxy, an integer cast of a shape), the nodes it
had emitted are removed, the submodule becomes a leaf (one ``call_module`` node) and tracing
goes on. Because the tracer enters submodules depth first, the smallest submodule that fails
is the one that becomes a leaf. Every node records the path of the module it came from in
``node.meta["fxadapt"]["module_path"]``.

torch.fx records the value that ``self.training`` has while tracing as a constant (the
``training`` argument of ``stochastic_depth`` or ``F.dropout``, an ``if self.training:``), so
``train()`` and ``eval()`` would no longer change what such a module computes. ``trace``
therefore traces the model a second time in the other mode and compares what each module
emitted. Every module whose own nodes differ is traced again with ``self.training`` read
from the GraphModule at run time (a ``get_attr`` node of ``training``), which keeps an
argument such as ``F.dropout(x, p, self.training)`` live. A submodule that branches on the
mode cannot be traced that way and becomes a leaf, which reads its own flag at run time. The
root cannot be a leaf: if it branches on the mode, its graph keeps the mode it was traced in
and a warning says so.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import inspect
import io
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

    def __init__(
        self,
        leaf_types: tuple[type, ...] = (),
        leaf_reasons: dict[str, str] | None = None,
        live_mode_modules: Iterable[str] = (),
        autowrap_functions: tuple = (),
    ):
        super().__init__(autowrap_functions=autowrap_functions)
        self.leaf_types = leaf_types
        self.leaf_reasons: dict[str, str] = dict(leaf_reasons or {})
        # Paths of the modules whose ``self.training`` is read from the graph ("" is the root).
        self.live_mode_modules = set(live_mode_modules)
        self.attribute_proxies: dict[str, torch.fx.Proxy] = {}
        # Path of every module called while tracing, leaves included, to its caller's path.
        self.module_to_caller: dict[str, str] = {}

    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        finally:
            if isinstance(root, torch.nn.Module):
                _restore_training(root)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        root_fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        if is_module and concrete_args is None:
            args = self._bind_optional_inputs(args)
        # The graph exists from here on, so the root's training flag can become a node.
        if is_module and "" in self.live_mode_modules:
            _read_training_from_graph(self.root, self._training_proxy())
        return root_fn, args

    def _bind_optional_inputs(self, args: list) -> list:
        """Passes their default to the root's inputs after the first that have one.

        fxadapt calls a model with one input, so ``forward(x, mask=None)`` is traced with
        ``mask`` None instead of a placeholder that ``if mask is not None`` takes for a tensor.
        The placeholder is removed, so the GraphModule takes only the first input.
        """
        parameters = list(inspect.signature(type(self.root).forward).parameters.values())[1:]
        variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        if any(parameter.kind in variadic for parameter in parameters):
            return args
        args = list(args)
        # args[0] is the root module itself and args[1] the model input.
        for index, parameter in enumerate(parameters[1:], start=2):
            value = args[index] if index < len(args) else None
            if parameter.default is inspect.Parameter.empty or not isinstance(
                value, torch.fx.Proxy
            ):
                continue
            if value.node.op == "placeholder" and not value.node.users:
                self.graph.erase_node(value.node)
                args[index] = parameter.default
        return args

    def _training_proxy(self) -> torch.fx.Proxy:
        return self.create_proxy("get_attr", "training", (), {})

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        if qualified_name in self.leaf_reasons:
            return True
        if self.leaf_types and isinstance(module, self.leaf_types):
            return True
        return super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        qualified_name = self.path_of_module(module)
        # The module is not on the stack yet, so the innermost module on it is the caller.
        caller = next(reversed(self.module_stack.values()))[0] if self.module_stack else ""
        self.module_to_caller.setdefault(qualified_name, caller)
        if qualified_name == "" or self.is_leaf_module(module, qualified_name):
            return super().call_module(module, forward, args, kwargs)

        last_node = self.graph._root.prev
        module_stack = collections.OrderedDict(self.module_stack)
        num_calls = dict(self.num_calls)
        live_mode = qualified_name in self.live_mode_modules
        try:
            if live_mode:
                _read_training_from_graph(module, self._training_proxy())
            return super().call_module(module, forward, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any failure inside forward makes a leaf
            self._erase_after(last_node)
            self.module_stack = module_stack
            self.num_calls = num_calls
            # A module in live mode traced before its flag became a node, so the flag is why.
            self.leaf_reasons[qualified_name] = _MODE_REASON if live_mode else _short_reason(err)
            logger.info("kept %s as a leaf: %s", qualified_name, self.leaf_reasons[qualified_name])
            return super().call_module(module, forward, args, kwargs)
        finally:
            if live_mode:
                _restore_training(module)

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
    first when the two must not share weights. A model that already is a GraphModule from
    ``trace`` (for example a backbone cut from a traced model) keeps its graph, so its nodes
    keep the module paths that cells are found by.

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
    if isinstance(model, torch.fx.GraphModule) and _has_module_paths(model):
        graph = copy.deepcopy(model.graph)
        return TraceResult(torch.fx.GraphModule(model, graph, type(model).__name__), {})
    leaf_types = tuple(leaf_types)
    tracer = _trace_once(model, leaf_types, concrete_args, {}, set())
    root_keeps_mode = False
    for _ in range(_MAX_MODE_ROUNDS):
        differing, other_mode_leaves = _compare_modes(model, tracer, leaf_types, concrete_args)
        if root_keeps_mode:
            differing.discard("")
        if not differing and not other_mode_leaves:
            break
        leaf_reasons = {**tracer.leaf_reasons, **other_mode_leaves}
        live_mode_modules = tracer.live_mode_modules | differing
        try:
            tracer = _trace_once(model, leaf_types, concrete_args, leaf_reasons, live_mode_modules)
        except TraceError:
            if "" not in live_mode_modules:
                raise
            root_keeps_mode = True
            live_mode_modules.discard("")
            tracer = _trace_once(model, leaf_types, concrete_args, leaf_reasons, live_mode_modules)
    if root_keeps_mode:
        logger.warning(
            "%s.forward branches on the training mode, so the traced graph computes what the "
            "%s-mode forward computes in both modes",
            type(model).__name__,
            "training" if model.training else "eval",
        )

    _erase_unused_training_reads(tracer.graph)
    _annotate_input_as_tensor(tracer.graph)
    graph_module = torch.fx.GraphModule(tracer.root, tracer.graph, type(model).__name__)
    _record_module_paths(graph_module)
    _drop_zero_adds(graph_module)
    for path, reason in tracer.leaf_reasons.items():
        logger.info("leaf %s: %s", path, reason)
    return TraceResult(graph_module, dict(tracer.leaf_reasons))


# Each round of the training-mode check traces the model twice. A round can only change the
# modules that differed in the round before, so three rounds settle the models seen so far.
_MAX_MODE_ROUNDS = 3

_MODE_REASON = "its forward branches on the training mode (self.training)"


def _trace_once(
    model: torch.nn.Module,
    leaf_types: tuple[type, ...],
    concrete_args: dict | None,
    leaf_reasons: dict[str, str],
    live_mode_modules: set[str],
) -> _FallbackTracer:
    """Traces ``model`` in its current mode, starting from the given leaves.

    Returns:
        The tracer, with the graph and every leaf and its reason.
    """
    autowrap_functions = _declared_untraceable_functions(model)
    tracer = _FallbackTracer(leaf_types, leaf_reasons, live_mode_modules, autowrap_functions)
    try:
        tracer.graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as err:
        raise TraceError(_root_failure_message(model, err)) from err
    return tracer


def _compare_modes(
    model: torch.nn.Module,
    tracer: _FallbackTracer,
    leaf_types: tuple[type, ...],
    concrete_args: dict | None,
) -> tuple[set[str], dict[str, str]]:
    """Traces ``model`` in the other training mode and compares it with ``tracer``'s graph.

    Every module's mode is flipped for the trace and put back afterwards.

    Returns:
        The paths of the modules whose own nodes differ ("" for the root), and the submodules
        that only fail to trace in the other mode, with the reason each failed.
    """
    module_to_mode = {module: module.training for module in model.modules()}
    model.train(not model.training)
    try:
        other = _trace_once(
            model, leaf_types, concrete_args, tracer.leaf_reasons, tracer.live_mode_modules
        )
    except TraceError as err:
        logger.warning(
            "%s cannot be traced in the other training mode, so its graph keeps the mode it "
            "is in: %s",
            type(model).__name__,
            err,
        )
        return set(), {}
    finally:
        for module, mode in module_to_mode.items():
            module.training = mode

    other_mode_leaves = {
        path: reason
        for path, reason in other.leaf_reasons.items()
        if path not in tracer.leaf_reasons
    }
    return _modules_with_different_nodes(tracer, other), other_mode_leaves


def _declared_untraceable_functions(model: torch.nn.Module) -> tuple:
    """Returns the functions that the model's library declares torch.fx must not trace into.

    timm lists such functions for its own torch.fx feature extraction
    (``timm.layers.get_notrace_functions``), for example the resampling of position embeddings,
    which branches on shapes. Each call of one becomes a single ``call_function`` node, as with
    ``torch.fx.wrap``. timm is only imported when the model contains modules of timm.
    """
    if not any(type(module).__module__.startswith("timm.") for module in model.modules()):
        return ()
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return ()
    return tuple(get_notrace_functions())


def _read_training_from_graph(module: torch.nn.Module, proxy: torch.fx.Proxy) -> None:
    """Makes ``module.training`` a graph value until ``_restore_training`` puts the flag back."""
    module.__dict__["_fxadapt_traced_training"] = module.__dict__["training"]
    module.__dict__["training"] = proxy


def _restore_training(module: torch.nn.Module) -> None:
    if "_fxadapt_traced_training" in module.__dict__:
        module.__dict__["training"] = module.__dict__.pop("_fxadapt_traced_training")


def _annotate_input_as_tensor(graph: torch.fx.Graph) -> None:
    """Annotates the first input as a tensor, which is what fxadapt passes to the model.

    The placeholder keeps the annotation of ``forward``'s argument, which may be wider (timm's
    NaFlexViT takes a tensor or a dict of tensors), and TorchScript compiles the generated
    ``forward`` by that annotation.
    """
    placeholder = next((node for node in graph.nodes if node.op == "placeholder"), None)
    if placeholder is not None and placeholder.type is not None:
        placeholder.type = torch.Tensor


def _erase_unused_training_reads(graph: torch.fx.Graph) -> None:
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target == "training" and not node.users:
            graph.erase_node(node)


def _modules_with_different_nodes(tracer: _FallbackTracer, other: _FallbackTracer) -> set[str]:
    """Returns the paths of the modules whose own nodes differ between two traces.

    A module that runs in one trace only is not at fault itself: the module that calls it
    (or the first caller that runs in both) is returned in its place.
    """
    signatures = _module_to_node_signatures(tracer.graph)
    other_signatures = _module_to_node_signatures(other.graph)
    path_to_caller = {**other.module_to_caller, **tracer.module_to_caller}
    differing = set()
    for path in set(signatures) | set(other_signatures):
        if signatures.get(path) == other_signatures.get(path):
            continue
        while path and not (path in tracer.module_to_caller and path in other.module_to_caller):
            path = path_to_caller.get(path, "")
        differing.add(path)
    return differing


def _module_to_node_signatures(graph: torch.fx.Graph) -> dict[str, list[tuple]]:
    """Returns module path to what each node it emitted computes, with node inputs left out."""
    path_to_signatures: dict[str, list[tuple]] = {}
    for node in graph.nodes:
        path, _ = _owning_module(node)
        constants = torch.fx.node.map_arg((node.args, node.kwargs), lambda _: "<node>")
        signature = (node.op, str(node.target), repr(constants))
        path_to_signatures.setdefault(path, []).append(signature)
    return path_to_signatures


def _has_module_paths(graph_module: torch.fx.GraphModule) -> bool:
    return all("fxadapt" in node.meta for node in graph_module.graph.nodes)


def propagate_shapes(graph_module: torch.fx.GraphModule, example_input: torch.Tensor) -> None:
    """Records the shape and dtype of every node in ``node.meta["tensor_meta"]``.

    The module runs once in eval mode on ``example_input`` so that batch statistics and
    running averages are left as they were.

    Raises:
        TraceError: when the model does not accept the example input.
    """
    was_training = graph_module.training
    graph_module.eval()
    propagator = _NodeTrackingShapeProp(graph_module)
    try:
        # ShapeProp prints the traceback of a failing node before it raises. The error below
        # reports the failure in one line instead.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            propagator.propagate(example_input)
    except Exception as err:
        cause = err.__cause__ or err
        shape = tuple(example_input.shape)
        where = _expected_input(graph_module, propagator.current_node)
        raise TraceError(
            f"the model failed on an example input of shape {shape}{where}: "
            f"{_short_reason(cause)}; check that the data fits the model (input channels, "
            "image size)"
        ) from cause
    finally:
        graph_module.train(was_training)


class _NodeTrackingShapeProp(ShapeProp):
    """ShapeProp that remembers the node it runs, so that a failure can name it."""

    current_node: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node):
        self.current_node = n
        return super().run_node(n)


def _expected_input(graph_module: torch.fx.GraphModule, node: torch.fx.Node | None) -> str:
    """Says which layer failed and the input size it expects, for a shape error."""
    if node is None or node.op != "call_module":
        return f" at node {node.name}" if node is not None else ""
    module = graph_module.get_submodule(node.target)
    described = f" at {node.target} ({type(module).__name__}"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return f"{described}, which expects {module.in_channels} input channels)"
    if isinstance(module, torch.nn.Linear):
        return f"{described}, which expects {module.in_features} input features)"
    return described + ")"


def node_info(node: torch.fx.Node) -> dict:
    """Returns the fxadapt facts recorded on ``node`` (an empty dict when there are none)."""
    return node.meta.get("fxadapt", {})


def _record_module_paths(graph_module: torch.fx.GraphModule) -> None:
    """Records, for every node, the path and class of the module whose forward emitted it."""
    root_type = type(graph_module).__name__
    for node in graph_module.graph.nodes:
        path, type_name = _owning_module(node)
        node.meta["fxadapt"] = {"module_path": path, "module_type": type_name or root_type}


def _owning_module(node: torch.fx.Node) -> tuple[str, str]:
    """Returns the path and class name of the module whose forward emitted ``node``.

    The root module is ``("", "")``.
    """
    frames = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module":
        # The tracer pushes a leaf onto the stack before emitting its node; the module
        # that emitted the call is the one below it.
        frames = frames[:-1]
    if not frames:
        return "", ""
    path, module_type = frames[-1]
    return path, getattr(module_type, "__name__", str(module_type))


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
