"""Whether a run starts afresh or resumes, and whether a resume fits the run it continues.

``RunOptions.resume`` is one of:

- ``no``: a new run. The run directory must be empty or missing, unless ``overwrite``.
- ``yes``: continue the run in ``out`` from its checkpoint.
- ``auto``: continue when ``out`` contains a checkpoint. Start the run again when ``out``
  contains a run that stopped before its first checkpoint, and start a new run otherwise.
  torchrun restarts failed workers with the same arguments, so this is safe to pass every
  time.

A resume must train what the run trains: every option in its ``config.json`` except the
ones in ``FREE_OPTIONS`` (where the data, the outputs and the device are) must match.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fxadapt.checkpoint import read_checkpoint
from fxadapt.errors import FxadaptError
from fxadapt.rundir import RunDir

__all__ = ["RESUME_MODES", "FREE_OPTIONS", "RunStart", "plan_run_start", "find_mismatch"]

logger = logging.getLogger(__name__)

RESUME_MODES = ("no", "yes", "auto")

# Options that may change when a run resumes, because they set where files are and what is
# logged or written, not what is trained.
FREE_OPTIONS = frozenset(
    {
        "out",
        "overwrite",
        "resume",
        "formats",
        "draw",
        "tensorboard",
        "theta_every",
        "data_dir",
        "train.device",
    }
)

# Settings with no command-line flag of their own, named by their field instead.
_FIELD_ONLY = frozenset(
    {"wrap.backbone", "train.momentum", "train.arch_betas", "train.arch_weight_decay"}
)


@dataclass
class RunStart:
    """The start of a run: from a checkpoint, or afresh.

    Attributes:
        checkpoint: the checkpoint to continue from, or None for a fresh start.
        replace: whether the run directory's files are removed before the fresh start.
    """

    checkpoint: dict | None
    replace: bool


def plan_run_start(options) -> RunStart:
    """Checks the run directory of ``options`` and returns how the run begins.

    Args:
        options: a ``RunOptions``, with the defaults of its objective applied.

    Raises:
        FxadaptError: when the directory contains files of another kind or another run, when a
            requested resume finds no run or no checkpoint, or when the options do not
            match the run's.
    """
    if options.resume not in RESUME_MODES:
        raise ValueError(f"resume must be one of {RESUME_MODES}, got {options.resume!r}")
    path = Path(options.out)
    if options.resume != "no" and options.overwrite:
        raise FxadaptError("--resume continues a run and --overwrite replaces it: pass one of them")
    if options.resume == "no":
        RunDir.check_free(path, overwrite=options.overwrite)
        return RunStart(checkpoint=None, replace=options.overwrite)

    has_checkpoint = (path / RunDir.CHECKPOINT).is_file()
    if options.resume == "auto" and not has_checkpoint:
        if not (path / RunDir.CONFIG).is_file():
            RunDir.check_free(path)
            return RunStart(checkpoint=None, replace=False)
        _check_same_run(options, RunDir(path, create=False))
        logger.warning("%s has no checkpoint yet, so the run starts again", path)
        return RunStart(checkpoint=None, replace=True)

    if not (path / RunDir.CONFIG).is_file():
        raise FxadaptError(
            f"cannot resume {path}: {RunDir.CONFIG} not found there; pass the --out folder "
            "of an earlier `fxadapt train`, or --resume auto to start a run there"
        )
    run = RunDir(path, create=False)
    _check_same_run(options, run)
    return RunStart(checkpoint=read_checkpoint(run), replace=False)


def find_mismatch(options, config: dict) -> tuple[str, object, object] | None:
    """Returns the first option whose value differs from the run's ``config.json``.

    Options missing from an older ``config.json`` count as their default.

    Returns:
        The option's name (its flag where it has one), the requested value and the run's
        value, or None when every option that matters matches.
    """
    for key, requested, saved in _compared_values(options, config, ""):
        if _normalise(key, requested) != _normalise(key, saved):
            return _label(key), requested, saved
    return None


def _check_same_run(options, run: RunDir) -> None:
    try:
        config = run.read_json(RunDir.CONFIG)
    except (OSError, ValueError) as err:
        raise FxadaptError(
            f"{run.file(RunDir.CONFIG)} cannot be read ({err}): start the run again with "
            "--overwrite"
        ) from err
    mismatch = find_mismatch(options, config)
    if mismatch is None:
        return
    name, requested, saved = mismatch
    raise FxadaptError(
        f"{name} {_show(requested)} does not match the run's {_show(saved)} in "
        f"{run.file(RunDir.CONFIG)}: resume with the run's options (`fxadapt train --resume "
        f"{run.path}` alone reuses them), or choose another --out for a new run"
    )


def _compared_values(options, config: dict, prefix: str):
    """Yields (key, requested value, run's value) for every option that must match."""
    for field in dataclasses.fields(options):
        key = prefix + field.name
        if key in FREE_OPTIONS:
            continue
        value = getattr(options, field.name)
        saved_section = config.get(field.name) if isinstance(config, dict) else None
        if dataclasses.is_dataclass(value):
            yield from _compared_values(value, saved_section or {}, key + ".")
        elif isinstance(config, dict) and field.name in config:
            yield key, value, config[field.name]
        else:
            yield key, value, _default(field)


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _normalise(key: str, value):
    # JSON turns tuples into lists; comparing JSON forms treats both alike.
    value = json.loads(json.dumps(value))
    if key == "wrap.model" and isinstance(value, str):
        location, separator, class_name = value.rpartition(":")
        if separator and location.endswith(".py"):
            return f"{Path(location).expanduser().resolve()}:{class_name}"
    return value


def _label(key: str) -> str:
    if key == "wrap.model":
        return "the model"
    if key == "wrap.model_args":
        return "--model-arg"
    if key in _FIELD_ONLY:
        return f"the setting {key}"
    return "--" + key.rpartition(".")[2].replace("_", "-")


def _show(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
