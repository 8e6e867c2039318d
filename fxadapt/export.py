"""Exporting a derived module, each file checked against the module before it is kept.

``torchscript`` (``model.ts``) is what users of the method deploy; it loads with plain
``torch.jit.load`` in a Python that has no fxadapt. ``exported-program`` (``model.pt2``) is a
``torch.export`` program, loaded with ``torch.export.load``. ``onnx`` (``model.onnx``) is
written by ``torch.onnx.export`` from a ``torch.export`` program and checked with onnxruntime;
it needs the packages of the ``onnx`` extra (``pip install "fxadapt[onnx]"``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tempfile
import warnings
from copy import deepcopy
from pathlib import Path

import torch
from torch import nn

from fxadapt.errors import ExportError

__all__ = ["FORMATS", "FORMAT_TO_FILENAME", "check_export_packages", "export", "load_exported"]

logger = logging.getLogger(__name__)

FORMAT_TO_FILENAME = {
    "torchscript": "model.ts",
    "exported-program": "model.pt2",
    "onnx": "model.onnx",
}
FORMATS = tuple(FORMAT_TO_FILENAME)

# Packages that each format needs beyond torch, and the extra that installs them.
_FORMAT_TO_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime")}

# An ONNX file is a protocol buffer, which cannot exceed 2 GiB. Weights larger than this go to
# a separate file beside it (``model.onnx.data``), leaving room for the graph.
_ONNX_MAX_INLINE_BYTES = 1 << 30


def export(
    module: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor,
    *,
    format: str = "torchscript",
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> Path:
    """Writes ``module`` to ``path`` in eval mode after checking that the file reproduces it.

    The file is written into a temporary folder beside ``path`` first, loaded back and run on
    ``example_input``. Only when its outputs match the module's does it replace ``path``. An
    ONNX file of a module with more than 1 GiB of weights comes with its weights in a second
    file, ``path`` with ``.data`` appended, which is moved beside it.

    Args:
        module: the derived module.
        path: the file to write.
        example_input: the probe batch.
        format: ``torchscript``, ``exported-program`` or ``onnx``.
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.

    Returns:
        The path written.

    Raises:
        ValueError: for an unknown format.
        ExportError: when the module cannot be exported, the file does not reproduce it, or a
            package the format needs is not installed.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    check_export_packages(format)
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(example_input)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as directory:
            # torch.export.load wants its own suffix, so the temporary file always has it.
            suffix = Path(FORMAT_TO_FILENAME[format]).suffix
            name = path.name if path.suffix == suffix else path.name + suffix
            temporary = Path(directory) / name
            _write(module, temporary, example_input, format)
            loaded = load_exported(temporary, format)
            with torch.no_grad():
                actual = loaded(example_input)
            del loaded
            _compare(expected, actual, format, atol, rtol)
            os.replace(temporary, path)
            for extra_file in Path(directory).iterdir():
                os.replace(extra_file, path.parent / extra_file.name)
    finally:
        module.train(was_training)
    logger.info("wrote %s (%s), checked on a batch of %d", path, format, len(example_input))
    return path


def load_exported(path: str | os.PathLike, format: str = "torchscript"):
    """Loads a file that ``export`` wrote and returns something to call on a batch.

    An ONNX file is returned as a callable that runs it with onnxruntime on the CPU and
    returns torch tensors: one tensor, or a tuple when the model has several outputs.
    """
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    if format == "onnx":
        check_export_packages(format)
        return _OnnxRuntimeModel(path)
    return torch.export.load(str(path)).module()


class _OnnxRuntimeModel:
    """An onnxruntime session on the CPU that takes and returns torch tensors."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, *inputs: torch.Tensor):
        names = [argument.name for argument in self.session.get_inputs()]
        if len(names) != len(inputs):
            raise ValueError(f"the ONNX model takes {len(names)} inputs, got {len(inputs)}")
        feeds = {
            name: value.detach().cpu().numpy() for name, value in zip(names, inputs, strict=True)
        }
        outputs = tuple(torch.from_numpy(array) for array in self.session.run(None, feeds))
        return outputs[0] if len(outputs) == 1 else outputs


def check_export_packages(format: str) -> None:
    """Raises ExportError naming the extra to install when ``format`` lacks a package."""
    missing = [
        package
        for package in _FORMAT_TO_PACKAGES.get(format, ())
        if importlib.util.find_spec(package) is None
    ]
    if missing:
        raise ExportError(
            f"{format} export needs {', '.join(missing)}, which is not installed: "
            f'pip install "fxadapt[{format}]"'
        )


def _write(module: nn.Module, path: str, example_input: torch.Tensor, format: str) -> None:
    try:
        if format == "torchscript":
            with warnings.catch_warnings():
                # torch.jit.script warns that it is deprecated from PyTorch 2.14 on; TorchScript
                # is still the format this method's users deploy, and model.pt2 is written too.
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=FutureWarning)
                # GraphModule keeps plain dicts (its meta) that TorchScript leaves out anyway.
                warnings.filterwarnings("ignore", message=".*instance-level annotations.*")
                torch.jit.save(_script(module, example_input), path)
        elif format == "onnx":
            _write_onnx(module, path, example_input)
        else:
            _write_exported_program(module, path, example_input)
    except Exception as err:
        raise ExportError(
            f"{format} export of {type(module).__name__} failed: {_describe_failure(err)}; "
            "try another --format"
        ) from err


def _describe_failure(err: BaseException) -> str:
    """Returns the first line of ``err`` and, when another error caused it, of the first cause.

    Exporters wrap the error that stopped them in one that names their step, and print
    coloured text; the colour codes are removed.
    """
    lines = [_first_line(err)]
    cause = err.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None:
        lines.append(f"{type(cause).__name__}: {_first_line(cause)}")
    return " caused by ".join(line for line in lines if line)


def _first_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _script(module: nn.Module, example_input: torch.Tensor) -> torch.jit.ScriptModule:
    """Compiles ``module`` to TorchScript: by scripting where it can, by tracing where it must.

    ``torch.jit.script`` comes first. When it fails on a GraphModule, the leaves that cannot be
    scripted (submodules that torch.fx could not trace either, often for the same reasons) are
    traced on the probe batch and the graph is scripted around them. When that fails too, the
    whole module is traced. Each fallback logs a warning.

    Raises:
        Exception: the scripting error, when no way works.
    """
    try:
        return torch.jit.script(module)
    except Exception as err:  # noqa: BLE001 - the fallbacks below may still work
        script_error = err
    scripted = _script_with_traced_leaves(module, example_input)
    if scripted is not None:
        return scripted

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(module, example_input, check_trace=False, strict=False)
    except Exception:  # noqa: BLE001 - the scripting error says more about the module
        raise script_error from None
    # NOTE: a traced module repeats the control flow it took on the probe batch, and may keep
    # some of its sizes as constants, so inputs of another shape can give wrong results. The
    # export check runs the probe batch only.
    logger.warning(
        "TorchScript cannot script %s (%s), so the whole module is traced on the probe batch "
        "of shape %s; use inputs of that shape",
        type(module).__name__,
        _describe_failure(script_error),
        tuple(example_input.shape),
    )
    return traced


def _script_with_traced_leaves(
    module: nn.Module, example_input: torch.Tensor
) -> torch.jit.ScriptModule | None:
    """Scripts ``module`` with its unscriptable leaves traced; returns None where that fails."""
    with_traced_leaves = _trace_unscriptable_leaves(module, example_input)
    if with_traced_leaves is None:
        return None
    copy, traced_targets = with_traced_leaves
    try:
        scripted = torch.jit.script(copy)
    except Exception:  # noqa: BLE001 - the caller falls back to tracing the whole module
        return None
    # NOTE: a traced leaf repeats the control flow it took on the probe batch, so inputs of
    # other shapes may take a path it does not have. The export check runs the probe batch.
    logger.warning(
        "TorchScript cannot script %s, so %s traced on the probe batch of shape %s",
        ", ".join(traced_targets),
        "it is" if len(traced_targets) == 1 else "they are",
        tuple(example_input.shape),
    )
    return scripted


def _trace_unscriptable_leaves(
    module: nn.Module, example_input: torch.Tensor
) -> tuple[nn.Module, list[str]] | None:
    """Returns a copy of ``module`` whose unscriptable leaves are traced, and their targets.

    Returns None when ``module`` is not a GraphModule, when every leaf scripts, or when a leaf
    takes an input that is not a tensor (or a keyword argument set to None), because
    ``torch.jit.trace`` cannot record one.
    """
    if not isinstance(module, torch.fx.GraphModule):
        return None
    targets = [node.target for node in module.graph.nodes if node.op == "call_module"]
    unscriptable = [
        target
        for target in dict.fromkeys(targets)
        if not _is_scriptable(module.get_submodule(target))
    ]
    if not unscriptable:
        return None

    target_to_inputs = _first_call_inputs(module, unscriptable, example_input)
    copy = deepcopy(module)
    for target in unscriptable:
        args, kwargs = target_to_inputs.get(target, (None, None))
        if args is None:
            return None
        # A keyword argument passed as None keeps its default when it is left out.
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        if not _only_tensors((args, kwargs)):
            return None
        with warnings.catch_warnings():
            # The tracer warns about every branch it fixes; _script warns once for all.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            traced = torch.jit.trace(
                copy.get_submodule(target),
                args,
                example_kwarg_inputs=kwargs or None,
                check_trace=False,
                strict=False,
            )
        copy.set_submodule(target, traced)

    # The traced leaves take no keyword argument that was None while tracing.
    for node in copy.graph.nodes:
        if node.op == "call_module" and node.target in unscriptable:
            node.kwargs = {name: value for name, value in node.kwargs.items() if value is not None}
    copy.recompile()
    return copy, unscriptable


def _is_scriptable(module: nn.Module) -> bool:
    if type(module).__module__.startswith("torch.nn."):
        return True
    try:
        torch.jit.script(module)
    except Exception:  # noqa: BLE001 - any failure means it is not scriptable
        return False
    return True


def _first_call_inputs(
    module: nn.Module, targets: list[str], example_input: torch.Tensor
) -> dict[str, tuple[tuple, dict]]:
    """Returns submodule path to the arguments of its first call on ``example_input``."""
    target_to_inputs: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for target in targets:

        def record(_, args, kwargs, target=target):
            target_to_inputs.setdefault(target, (args, kwargs))

        handle = module.get_submodule(target).register_forward_pre_hook(record, with_kwargs=True)
        handles.append(handle)
    try:
        with torch.no_grad():
            module(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return target_to_inputs


def _only_tensors(value) -> bool:
    return all(isinstance(leaf, torch.Tensor) for leaf in torch.utils._pytree.tree_leaves(value))


def _write_exported_program(
    module: nn.Module, path: str | os.PathLike, example_input: torch.Tensor
) -> None:
    program = torch.export.export(module, (example_input,))
    try:
        torch.export.save(program, path)
        return
    except NotImplementedError as err:
        if "namedtuple" not in str(err):
            raise
        reason = _first_line(err)
    # torch.export saves a namedtuple output only when its class is registered for
    # serialization, and a process that loads the file would have to register it too. A
    # tuple of the output's tensors loads anywhere.
    logger.warning(
        "the exported program returns the outputs of %s as a plain tuple of tensors (%s)",
        type(module).__name__,
        reason,
    )
    program = torch.export.export(_FlatOutputs(module), (example_input,))
    torch.export.save(program, path)


class _FlatOutputs(nn.Module):
    """Runs a module and returns the tensors of its output as one flat tuple."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.utils._pytree.tree_leaves(self.module(x)))


def _write_onnx(module: nn.Module, path: str | os.PathLike, example_input: torch.Tensor) -> None:
    weight_bytes = sum(
        tensor.numel() * tensor.element_size()
        for tensor in [*module.parameters(), *module.buffers()]
    )
    with warnings.catch_warnings():
        # The exporters warn about every operation they decompose and about their own
        # deprecation; the check after writing decides whether the file is right.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                (example_input,),
                str(path),
                verbose=False,
                external_data=weight_bytes > _ONNX_MAX_INLINE_BYTES,
            )
            return
        except Exception as err:  # noqa: BLE001 - the older exporter gets its chance
            dynamo_error = err
        # NOTE: the torch.export-based exporter of PyTorch 2.14 fails on some graphs that the
        # older TorchScript-based one converts, such as a view of the non-contiguous output of
        # a decomposed attention. So the older exporter, deprecated in 2.14, is tried second.
        logger.warning(
            "the torch.export-based ONNX exporter failed (%s); trying the TorchScript-based one",
            _describe_failure(dynamo_error),
        )
        for leftover in Path(path).parent.glob(Path(path).name + "*"):
            leftover.unlink()
        try:
            torch.onnx.export(module, (example_input,), str(path), dynamo=False)
        except Exception as err:
            raise RuntimeError(
                f"{_describe_failure(dynamo_error)}, and the TorchScript-based exporter "
                f"failed too: {_describe_failure(err)}"
            ) from dynamo_error


def _compare(expected, actual, format: str, atol: float, rtol: float) -> None:
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        raise ExportError(
            f"the {format} file returns {len(actual_leaves)} outputs, the module "
            f"{len(expected_leaves)}"
        )
    for position, (want, got) in enumerate(zip(expected_leaves, actual_leaves, strict=True)):
        if want.shape != got.shape:
            raise ExportError(
                f"the {format} file returns shape {tuple(got.shape)} at output {position}, "
                f"the module {tuple(want.shape)}"
            )
        if not torch.allclose(want, got, atol=atol, rtol=rtol):
            difference = float((want - got).abs().max())
            raise ExportError(
                f"the {format} file differs from the derived module at output {position} by "
                f"{difference:.3g} (tolerance {atol:g}); the module may use an operation that "
                "this format changes"
            )
