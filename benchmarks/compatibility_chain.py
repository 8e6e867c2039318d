"""The whole fxadapt chain on one model, with a check after every step.

0. Set the BatchNorm running statistics from the probe batch, so that the eval-mode
   activations of the random network stay near unit scale. This is repeated after the
   training step and after derivation, whose changes would otherwise let the activations
   grow again.
1. Wrap (trace with leaf fallback, insert mixed edges). The wrapped module must compute what
   the model computes, and so must the fused module that training runs (``fxadapt.fuse``).
2. One weight step, then one theta step of the fused module, on the same random batch.
3. Derive with hand-set theta that give one identity and one none decision where the edge
   table allows them. The derived module must compute what the mixed module computes with the
   theta of the options not chosen set to zero.
4. Export to every format. ``fxadapt.export`` checks each file against the derived module,
   with an absolute tolerance of 1e-4 of the largest output value.

A model without an additive merge has no edge to adapt, so ``fxadapt.wrap`` rejects it. For
such a model the chain checks the traced module instead, trains its weights for a step and
exports it as it is.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxadapt
from fxadapt.analysis import analyse
from fxadapt.costs import count_flops, count_parameters
from fxadapt.errors import TraceError
from fxadapt.export import FORMAT_TO_FILENAME, FORMATS
from fxadapt.tracing import propagate_shapes, trace

__all__ = ["ChainResult", "NOT_RUN", "PASS", "run_chain"]

logger = logging.getLogger(__name__)

PASS = "pass"
NOT_RUN = "not run"

# Largest difference between two modules that compute the same thing, relative to the largest
# magnitude of the expected output. Folding theta into weights changes the rounding of float32
# results, and the change grows with depth.
RELATIVE_TOLERANCE = 1e-4

# Hand-set theta. Identity wins over same on one edge. On another edge every option but none
# falls below zero, so none wins there.
_IDENTITY_THETA = {"same": 0.25, "identity": 0.75}
_NONE_THETA = {"same": -0.5, "identity": -0.5}


@dataclass
class ChainResult:
    """The findings of the chain on one model and the step where it stopped, as plain data.

    Attributes:
        edges: adaptable edges in the edge table.
        identity_edges: edges that admit identity.
        none_edges: edges that admit none.
        leaves: module path to the reason it was traced as a leaf.
        forced: option to the name of the edge whose theta was set to choose it.
        decisions: option to the number of edges that chose it.
        params_before: parameters of the model.
        params_after: parameters of the derived module.
        flops_before: FLOPs of one forward of the example input through the model.
        flops_after: the same for the derived module.
        exports: export format to ``pass``, ``not run`` or the reason it failed.
        failure: the step that failed and why, or "" when every step before export passed.
        notes: facts about the run that a reader of the table needs, such as a guard override.
    """

    edges: int = 0
    identity_edges: int = 0
    none_edges: int = 0
    leaves: dict[str, str] = field(default_factory=dict)
    forced: dict[str, str] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    exports: dict[str, str] = field(default_factory=dict)
    failure: str = ""
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Returns the result as plain data."""
        return asdict(self)


class ChainError(Exception):
    """A step of the chain ran but its check failed."""


def run_chain(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    num_classes: int,
    formats: tuple[str, ...] = FORMATS,
    name: str = "",
) -> ChainResult:
    """Runs the chain on ``model`` and returns what each step found.

    Args:
        model: a freshly built model with random weights. Its weights are moved to the
            ``meta`` device once the wrapped module is checked against it, to free memory, so
            it cannot be used afterwards.
        example_input: a batch of two or more samples the model accepts.
        num_classes: classes of the model's classifier, for the training step's loss.
        formats: export formats to try, from ``fxadapt.export.FORMATS``.
        name: the model's name, kept in the edge table.

    Returns:
        The result. A failed step is recorded in it, not raised, and the steps after it do
        not run.
    """
    result = ChainResult(exports=dict.fromkeys(formats, NOT_RUN))
    model.train()
    step = "calibrate"
    try:
        calibrate_batchnorm(model, example_input)

        step = "costs"
        result.params_before = count_parameters(model)
        result.flops_before = _count_flops(model, example_input, result)

        step = "wrap"
        with _collect_warnings("fxadapt.tracing") as messages:
            wrapped = _wrap(model, example_input, name, result)
        result.notes += [f"trace: {message}" for message in dict.fromkeys(messages)]
        _check_same_outputs(model, wrapped, example_input, "the wrapped module", result)
        _release_weights(model)

        trained = wrapped
        if fxadapt.is_wrapped(wrapped):
            step = "fuse"
            trained = fxadapt.fuse(wrapped)
            _check_same_outputs(wrapped, trained, example_input, "the fused module", result)

        step = "train step"
        # The fused module shares its weights and theta with the wrapped one, which is the
        # module that derivation reads.
        _train_step(trained, example_input, num_classes)
        del trained
        # The step moved the weights, so the running statistics no longer fit the
        # activations, and eval mode would amplify them again layer by layer.
        calibrate_batchnorm(wrapped, example_input)

        step = "derive"
        derived = _derive(wrapped, example_input, result)
        del wrapped
        result.params_after = count_parameters(derived)
        result.flops_after = _count_flops(derived, example_input, result)
    except Exception as err:  # noqa: BLE001 - the table records every failure
        result.failure = f"{step}: {short_reason(err)}"
        logger.info("%s failed at %s", name, step, exc_info=True)
        return result

    # The forced decisions change the activations after the edges they touch. Statistics
    # that fit the derived module keep its outputs near unit scale, where the rounding of
    # another runtime's kernels stays within the export check's tolerance.
    calibrate_batchnorm(derived, example_input)
    _export_all(derived, example_input, formats, result)
    return result


def calibrate_batchnorm(model: nn.Module, example_input: torch.Tensor) -> None:
    """Sets the running statistics of every BatchNorm to the statistics of ``example_input``.

    With the running statistics of a fresh model (mean 0, variance 1), the eval-mode
    activations of a deep random network grow layer by layer, up to 1e12 in Inception v3.
    float32 outputs of that size cannot be compared to a useful tolerance. With statistics
    of the batch itself, eval mode normalises as training mode does.

    The batch runs in eval mode with only the BatchNorm layers in training mode. Dropout
    and stochastic depth then act as they do in eval mode, so the statistics are those of
    the activations that eval mode produces.
    """
    layers = [
        layer
        for layer in model.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
    ]
    layer_to_momentum = {layer: layer.momentum for layer in layers}
    for layer in layers:
        layer.reset_running_stats()
        # A momentum of None averages over the batches seen, here the one batch.
        layer.momentum = None
    was_training = model.training
    model.eval()
    for layer in layers:
        layer.train()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for layer, momentum in layer_to_momentum.items():
            layer.momentum = momentum
        model.train(was_training)


def _release_weights(model: nn.Module) -> None:
    """Frees the memory of the model's parameters and buffers, which the caller still refers to.

    ``fxadapt.wrap`` works on a copy, so the largest models would otherwise be held twice
    through the rest of the chain.
    """
    try:
        model.to("meta")
    except Exception as err:  # noqa: BLE001 - the chain goes on, only with more memory in use
        logger.info("cannot move the weights of the model to meta: %s", err)


def short_reason(err: BaseException) -> str:
    """Returns the error's type and the first line of its message, at most 240 characters.

    Paths of installed packages are shortened to the part after ``site-packages/``.
    """
    message = str(err).strip()
    return short_reason_text(f"{type(err).__name__}: {message}" if message else type(err).__name__)


def short_reason_text(text: str) -> str:
    """Returns the first line of ``text``, shortened as ``short_reason`` shortens errors."""
    lines = text.strip().splitlines()
    text = re.sub(r"\S*/site-packages/", "", lines[0] if lines else "")
    return text if len(text) <= 240 else text[:237] + "..."


def _count_flops(module: nn.Module, example_input: torch.Tensor, result: ChainResult) -> int:
    """Returns ``fxadapt.costs.count_flops``, or the same count taken with autograd enabled.

    PyTorch's FLOP counter (2.14) fails under ``torch.no_grad`` when a module receives a
    parameter as input (CaiT's class token): its module tracker expects every input that
    requires grad to have a gradient function.
    """
    try:
        return count_flops(module, example_input)
    except AssertionError as err:
        note = f"FLOPs counted with autograd enabled ({short_reason(err)})"
        if note not in result.notes:
            result.notes.append(note)
    counter = FlopCounterMode(display=False)
    was_training = module.training
    module.eval()
    try:
        with counter:
            module(example_input)
    finally:
        module.train(was_training)
    return int(counter.get_total_flops())


def _wrap(
    model: nn.Module, example_input: torch.Tensor, name: str, result: ChainResult
) -> torch.fx.GraphModule:
    """Wraps ``model``, or returns its traced module when it has no edge."""
    try:
        wrapped = fxadapt.wrap(model, example_input, name=name)
    except TraceError:
        traced = trace(copy.deepcopy(model))
        propagate_shapes(traced.graph_module, example_input)
        table = analyse(traced.graph_module, leaves=traced.leaves, model=name)
        if table.edges:
            raise
        result.leaves = dict(traced.leaves)
        result.notes.append("no additive merge, so no edge: the traced module is exported")
        return traced.graph_module.train()

    table = fxadapt.edge_table(wrapped)
    result.edges = len(table.edges)
    result.identity_edges = sum("identity" in edge.options for edge in table.edges)
    result.none_edges = sum("none" in edge.options for edge in table.edges)
    result.leaves = dict(table.leaves)
    return wrapped


def _train_step(module: nn.Module, example_input: torch.Tensor, num_classes: int) -> None:
    """Runs one weight step and then one theta step on the same batch, in training mode.

    The gradient norm is clipped to 1. A random network fed two samples can have gradients so
    large that one plain step pushes its eval-mode activations past float32's range, and the
    step is there to exercise the updates, not to learn.
    """
    module.train()
    targets = torch.arange(len(example_input)) % num_classes
    groups = [_weights(module)]
    optimizers = [torch.optim.SGD(groups[0], lr=0.01)]
    if fxadapt.is_wrapped(module):
        groups.append(fxadapt.arch_parameters(module))
        optimizers.append(torch.optim.Adam(groups[1], lr=0.01))
    for parameters, optimizer in zip(groups, optimizers, strict=True):
        optimizer.zero_grad(set_to_none=True)
        loss = _loss(module(example_input), targets, num_classes)
        if not torch.isfinite(loss):
            raise ChainError(f"the training loss is {float(loss)}")
        loss.backward()
        nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _weights(module: nn.Module) -> list[nn.Parameter]:
    if fxadapt.is_wrapped(module):
        return fxadapt.weight_parameters(module)
    return list(module.parameters())


def _loss(output, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Returns the cross-entropy summed over every classifier output (auxiliary heads too).

    An output is a classifier output when it has one row per sample and ``num_classes``
    columns. Without one, the mean square of every floating-point output is the loss.
    """
    tensors = [
        value
        for value in torch.utils._pytree.tree_leaves(output)
        if isinstance(value, torch.Tensor) and value.is_floating_point()
    ]
    logits = [value for value in tensors if value.shape == (len(targets), num_classes)]
    if logits:
        return sum(nn.functional.cross_entropy(value, targets) for value in logits)
    if not tensors:
        raise ChainError("the model returns no floating-point tensor to train on")
    return sum(value.square().mean() for value in tensors)


def _derive(
    wrapped: torch.fx.GraphModule, example_input: torch.Tensor, result: ChainResult
) -> torch.fx.GraphModule:
    """Forces one identity and one none decision, derives, and checks the derived module."""
    if not fxadapt.is_wrapped(wrapped):
        return wrapped

    table = fxadapt.edge_table(wrapped)
    result.forced = _force_decisions(wrapped, table)
    derived = fxadapt.derive(wrapped)
    decided = fxadapt.edge_table(derived)
    for option in ("same", "identity", "none"):
        result.decisions[option] = sum(edge.decision == option for edge in decided.edges)

    id_to_edge = {edge.name: edge for edge in decided.edges}
    for option, edge_name in result.forced.items():
        decision = id_to_edge[edge_name].decision
        if decision != option:
            result.notes.append(f"{edge_name} was set to {option} but derived as {decision}")
    guarded = [edge.name for edge in decided.edges if edge.guarded]
    if guarded:
        result.notes.append(f"the guard kept {', '.join(guarded)}")

    _zero_unchosen_theta(wrapped, decided)
    decisions = {edge.id: edge.decision for edge in decided.edges}

    def derive_in_float64(wrapped, derived):
        # Derivation folds theta into weights, rounded to the weights' precision. So the
        # float64 check derives again from the float64 wrapped module, with the same
        # decisions, rather than converting the float32 derived module.
        del derived
        wrapped_float64 = wrapped.double()
        return wrapped_float64, fxadapt.derive(wrapped_float64, decisions)

    _check_same_outputs(
        wrapped, derived, example_input, "the derived module", result, derive_in_float64
    )
    return derived


def _force_decisions(wrapped: torch.fx.GraphModule, table) -> dict[str, str]:
    """Sets theta so that one edge chooses identity and another none.

    The none edge is the last edge that admits none, other than the identity edge, preferring
    one with an operation (so that derivation prunes weights). It is the only none in its
    merge, so the guard leaves it alone.

    Returns:
        Option to the name of the edge forced to it.
    """
    forced = {}
    identity_edge = next((edge for edge in table.edges if "identity" in edge.options), None)
    if identity_edge is not None:
        _set_theta(wrapped, identity_edge, _IDENTITY_THETA)
        forced["identity"] = identity_edge.name

    none_edges = [
        edge for edge in table.edges if "none" in edge.options and edge is not identity_edge
    ]
    with_operation = [edge for edge in none_edges if edge.nodes]
    none_edge = (with_operation or none_edges or [None])[-1]
    if none_edge is not None:
        _set_theta(wrapped, none_edge, _NONE_THETA)
        forced["none"] = none_edge.name
    return forced


def _set_theta(wrapped: torch.fx.GraphModule, edge, option_to_value: dict[str, float]) -> None:
    mixed = wrapped.fxadapt_mixed[edge.theta]
    with torch.no_grad():
        for option, value in option_to_value.items():
            if option in edge.options:
                getattr(mixed, f"theta_{option}").fill_(value)


def _zero_unchosen_theta(wrapped: torch.fx.GraphModule, decided) -> None:
    """Sets the theta of every option an edge did not choose to zero, as derivation assumes."""
    with torch.no_grad():
        for edge in decided.edges:
            mixed = wrapped.fxadapt_mixed[edge.theta]
            for option in edge.options:
                if option not in (edge.decision, "none"):
                    getattr(mixed, f"theta_{option}").fill_(0.0)


def _check_same_outputs(
    reference: nn.Module,
    module: nn.Module,
    example_input: torch.Tensor,
    label: str,
    result: ChainResult,
    in_float64=None,
) -> None:
    """Checks that ``module`` reproduces ``reference`` in eval mode.

    When the two return different structures in eval mode (a root module whose forward
    depends on the training mode, traced in training mode), they are compared in training
    mode instead, with the random number generator reset before each forward.

    A random network in eval mode can amplify float32 rounding until two exact rewrites of
    it differ by more than the tolerance: after the training step, the running statistics
    of its BatchNorm layers no longer fit its activations. Where float32 fails, the check is
    repeated in float64, which has about 29 more bits of precision. A pass there is a pass,
    with both errors in the row's notes. ``in_float64(reference, module)`` returns the two
    modules in float64; by default they are converted in place, and both are converted back
    to float32 afterwards.
    """
    error = _largest_error(reference, module, example_input, label)
    if error <= RELATIVE_TOLERANCE:
        return
    if in_float64 is None:
        in_float64 = _converted_to_float64
    try:
        reference_float64, module_float64 = in_float64(reference, module)
        error_float64 = _largest_error(
            reference_float64, module_float64, example_input.double(), label
        )
    finally:
        reference.float()
        module.float()
    if error_float64 > RELATIVE_TOLERANCE:
        raise ChainError(
            f"{label} differs by {error:.3g} of the largest output value in float32 and by "
            f"{error_float64:.3g} in float64 (tolerance {RELATIVE_TOLERANCE:g})"
        )
    result.notes.append(
        f"{label} differs by {error:.3g} of the largest output value in float32 and by "
        f"{error_float64:.3g} in float64"
    )


def _converted_to_float64(reference: nn.Module, module: nn.Module):
    return reference.double(), module.double()


def _largest_error(
    reference: nn.Module, module: nn.Module, example_input: torch.Tensor, label: str
) -> float:
    """Returns the largest relative error over the outputs of ``module`` against ``reference``."""
    expected = _run(reference, example_input, training=False)
    actual = _run(module, example_input, training=False)
    if len(expected) != len(actual):
        expected = _run(reference, example_input, training=True)
        actual = _run(module, example_input, training=True)
    if len(expected) != len(actual):
        raise ChainError(f"{label} returns {len(actual)} tensors, the reference {len(expected)}")
    errors = [relative_error(want, got) for want, got in zip(expected, actual, strict=True)]
    return max(errors, default=0.0)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Returns the largest difference relative to the largest magnitude of ``expected``."""
    if expected.shape != actual.shape:
        raise ChainError(f"shape {tuple(actual.shape)} differs from {tuple(expected.shape)}")
    expected, actual = expected.double(), actual.double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    difference = float((expected - actual).abs().max()) if expected.numel() else 0.0
    return difference / max(scale, 1e-12)


def _run(module: nn.Module, example_input: torch.Tensor, *, training: bool) -> list:
    """Runs ``module`` in the given mode and returns the tensors of its output.

    In training mode BatchNorm updates its running statistics, so the module runs on a copy.
    """
    was_training = module.training
    if training:
        module = copy.deepcopy(module)
    module.train(training)
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            output = module(example_input)
    finally:
        module.train(was_training)
    return [
        value
        for value in torch.utils._pytree.tree_leaves(output)
        if isinstance(value, torch.Tensor)
    ]


def _export_all(
    derived: nn.Module, example_input: torch.Tensor, formats: tuple[str, ...], result
) -> None:
    """Exports ``derived`` to every format, recording pass or the reason it failed.

    A warning that the exporter logs (a fallback to tracing, or to the older ONNX exporter)
    becomes a note of the row, because it changes what the file can be trusted with.
    """
    with tempfile.TemporaryDirectory(prefix="fxadapt-compatibility-") as directory:
        for format in formats:
            with _collect_warnings("fxadapt.export") as messages:
                _export_one(derived, Path(directory), example_input, format, result)
            result.notes += [f"{format}: {message}" for message in messages]


def _export_one(derived, directory: Path, example_input, format: str, result) -> None:
    path = directory / FORMAT_TO_FILENAME[format]
    try:
        atol = _export_tolerance(derived, example_input)
        fxadapt.export(derived, path, example_input, format=format, atol=atol)
        result.exports[format] = PASS
    except Exception as err:  # noqa: BLE001 - the table records every failure
        result.exports[format] = short_reason(err)
        logger.info("%s export failed", format, exc_info=True)
        if "differs from the derived module" in str(err):
            sensitivity = _rounding_sensitivity(derived, example_input)
            if sensitivity > RELATIVE_TOLERANCE:
                result.exports[format] = (
                    f"outputs differ beyond the tolerance, but the derived module itself "
                    f"changes by {sensitivity:.3g} of its largest output between float32 and "
                    "float64 on this probe batch: rounding dominates them"
                )
    finally:
        for written in directory.iterdir():
            written.unlink()


def _rounding_sensitivity(derived: nn.Module, example_input: torch.Tensor) -> float:
    """Returns how much the derived module's eval outputs change from float32 to float64.

    A deep random network at a small input size can have BatchNorm channels whose two
    probe values nearly coincide. Eval mode divides by a variance near zero there, and the
    rounding of float32 grows from layer to layer until it decides the outputs. Another
    runtime's kernels round differently, so no export of such a module can match it.
    """
    try:
        expected = _run(copy.deepcopy(derived).double(), example_input.double(), training=False)
        actual = _run(derived, example_input, training=False)
        errors = [relative_error(want, got) for want, got in zip(expected, actual, strict=True)]
        return max(errors, default=0.0)
    except Exception as err:  # noqa: BLE001 - the failure is already recorded
        logger.info("cannot measure the rounding sensitivity: %s", err)
        return 0.0


@contextlib.contextmanager
def _collect_warnings(logger_name: str):
    """Yields a list that receives the message of every warning the logger emits meanwhile."""
    collector = _WarningCollector()
    emitter = logging.getLogger(logger_name)
    emitter.addHandler(collector)
    try:
        yield collector.messages
    finally:
        emitter.removeHandler(collector)


def _export_tolerance(derived: nn.Module, example_input: torch.Tensor) -> float:
    """Returns the absolute tolerance of the export check: 1e-4 of the largest output value.

    Exporters run other float32 kernels than PyTorch's eager mode, and their rounding
    differences grow with the size of the values, so a fixed absolute tolerance (1e-5 by
    default) fails deep networks whose outputs are large. The floor is that default.
    """
    outputs = _run(derived, example_input, training=False)
    scale = max((float(output.abs().max()) for output in outputs if output.numel()), default=0.0)
    return max(1e-5, RELATIVE_TOLERANCE * scale)


class _WarningCollector(logging.Handler):
    """A logging handler that keeps the message of every warning it receives."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(short_reason_text(record.getMessage()))
