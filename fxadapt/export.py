"""Exporting a derived module, each file checked against the module before it is kept.

``torchscript`` (``model.ts``) is what users of the method deploy; it loads with plain
``torch.jit.load`` in a Python that has no fxadapt. ``exported-program`` (``model.pt2``) is a
``torch.export`` program, loaded with ``torch.export.load``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from fxadapt.errors import ExportError

__all__ = ["FORMATS", "FORMAT_TO_FILENAME", "export", "load_exported"]

logger = logging.getLogger(__name__)

FORMAT_TO_FILENAME = {"torchscript": "model.ts", "exported-program": "model.pt2"}
FORMATS = tuple(FORMAT_TO_FILENAME)


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

    The file is written beside ``path`` first, loaded back and run on ``example_input``; only
    when its outputs match the module's does it replace ``path``.

    Args:
        module: the derived module.
        path: the file to write.
        example_input: the probe batch.
        format: ``torchscript`` or ``exported-program``.
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.

    Returns:
        The path written.

    Raises:
        ValueError: for an unknown format.
        ExportError: when the module cannot be exported or the file does not reproduce it.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    path = Path(path)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(example_input)
        suffix = Path(FORMAT_TO_FILENAME[format]).suffix
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".export-", suffix=suffix)
        os.close(handle)
        try:
            _write(module, temporary, example_input, format)
            loaded = load_exported(temporary, format)
            with torch.no_grad():
                actual = loaded(example_input)
            _compare(expected, actual, format, atol, rtol)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    finally:
        module.train(was_training)
    logger.info("wrote %s (%s), checked on a batch of %d", path, format, len(example_input))
    return path


def load_exported(path: str | os.PathLike, format: str = "torchscript"):
    """Loads a file that ``export`` wrote and returns something to call on a batch."""
    if format == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    return torch.export.load(str(path)).module()


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
                torch.jit.save(torch.jit.script(module), path)
        else:
            program = torch.export.export(module, (example_input,))
            torch.export.save(program, path)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"{format} export of {type(module).__name__} failed: {first_line}; try another --format"
        ) from err


def _compare(expected, actual, format: str, atol: float, rtol: float) -> None:
    expected_leaves = torch.utils._pytree.tree_leaves(expected)
    actual_leaves = torch.utils._pytree.tree_leaves(actual)
    if len(expected_leaves) != len(actual_leaves):
        raise ExportError(
            f"the {format} file returns {len(actual_leaves)} outputs, the module "
            f"{len(expected_leaves)}"
        )
    for position, (want, got) in enumerate(zip(expected_leaves, actual_leaves)):
        if not torch.allclose(want, got, atol=atol, rtol=rtol):
            difference = float((want - got).abs().max())
            raise ExportError(
                f"the {format} file differs from the derived module at output {position} by "
                f"{difference:.3g} (tolerance {atol:g}); the module may use an operation that "
                "this format changes"
            )
