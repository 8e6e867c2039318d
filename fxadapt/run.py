"""The main job as functions the CLI calls: train a run, rebuild it, export it, draw it.

A run directory holds everything needed to rebuild the derived module without pickled
modules: the configuration (model specification, its arguments, the wrap options and the
input shape), the edge table with decisions and theta, and the derived weights.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx

from fxadapt import api
from fxadapt.costs import compare_costs
from fxadapt.data import load_data, make_loaders
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.export import FORMAT_TO_FILENAME, export
from fxadapt.loading import build_model
from fxadapt.report import build_report, write_report
from fxadapt.rundir import RunDir
from fxadapt.trainer import EpochRecord, TrainConfig, Trainer, TrainProgress, resolve_device

__all__ = [
    "RunOptions",
    "WrapOptions",
    "train_run",
    "rebuild_derived",
    "export_run",
    "draw_run",
    "wrap_model",
]

logger = logging.getLogger(__name__)


@dataclass
class WrapOptions:
    """How to load and wrap a model.

    Attributes:
        model: ``path/to/file.py:Class`` or ``package.module:Class``.
        model_args: keyword arguments of the model's constructor.
        granularity: ``branch`` or ``layer``.
        scope: ``full`` or ``cell``.
    """

    model: str
    model_args: dict = field(default_factory=dict)
    granularity: str = "branch"
    scope: str = "full"


@dataclass
class RunOptions:
    """Everything ``fxadapt train`` needs; saved as ``config.json``."""

    wrap: WrapOptions
    out: str
    data: str = "digits"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    formats: tuple[str, ...] = ("torchscript",)
    overwrite: bool = False
    draw: bool = True

    def to_dict(self) -> dict:
        """Returns the options as plain data."""
        return asdict(self)


def wrap_model(
    options: WrapOptions, input_shape: tuple[int, ...]
) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """Builds the model of ``options`` and wraps it on an example batch of ``input_shape``.

    Returns:
        The original model and the wrapped one.
    """
    model = build_model(options.model, options.model_args)
    example = _example_batch(input_shape)
    wrapped = api.wrap(
        model,
        example,
        granularity=options.granularity,
        scope=options.scope,
        name=options.model,
    )
    return model, wrapped


def train_run(options: RunOptions, progress: TrainProgress | None = None) -> dict:
    """Trains, derives, exports and draws one run; returns its report.

    Raises:
        FxadaptError: for bad input, with a message that says what to change.
    """
    options.train.check()
    RunDir.check_free(options.out, overwrite=options.overwrite)
    resolve_device(options.train.device)
    data = load_data(
        options.data,
        options.data_dir,
        train_limit=options.train_limit,
        test_limit=options.test_limit,
        seed=options.train.seed,
    )
    torch.manual_seed(options.train.seed)
    model, wrapped = wrap_model(options.wrap, data.input_shape)
    _check_classes(wrapped, data)

    run = RunDir(options.out, overwrite=options.overwrite)
    config = options.to_dict()
    config["input_shape"] = list(data.input_shape)
    config["num_classes"] = data.num_classes
    config["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    run.write_json(RunDir.CONFIG, config)
    api.edge_table(wrapped).save(run.file(RunDir.EDGES))

    train_loader, test_loader = make_loaders(
        data, options.train.batch_size, seed=options.train.seed
    )
    trainer = Trainer(
        wrapped,
        train_loader,
        test_loader,
        options.train,
        progress=progress,
        on_epoch=lambda trainer, record: _after_epoch(run, trainer, record),
    )
    result = trainer.fit()
    derived = result.derived.cpu().eval()
    table = result.table
    table.save(run.file(RunDir.EDGES))
    run.save_tensors(RunDir.DERIVED, {"state_dict": derived.state_dict()})

    example = _example_batch(data.input_shape)
    exports = {}
    for format in options.formats:
        path = export(derived, run.file(FORMAT_TO_FILENAME[format]), example, format=format)
        exports[format] = path.name
    diagrams = (
        draw_run(run.path, wrapped=trainer.wrapped.cpu(), table=table) if options.draw else []
    )

    costs = compare_costs(
        {"original": model.eval(), "wrapped": trainer.wrapped.cpu().eval(), "derived": derived},
        example[:1],
    )
    report = build_report(
        table=table,
        costs=costs,
        history=[record.to_dict() for record in result.history],
        config=config,
        exports=exports,
        diagrams=[str(path.relative_to(run.path)) for path in diagrams],
    )
    write_report(run, report)
    return report


def rebuild_derived(run_path: str | Path) -> tuple[torch.fx.GraphModule, EdgeTable, dict]:
    """Rebuilds a run's derived module from its model, decisions, theta and weights.

    Returns:
        The derived module (in eval mode), its edge table and the run's configuration.

    Raises:
        FxadaptError: when the run has not derived yet.
    """
    run = RunDir(run_path, create=False)
    config = run.read_json(RunDir.CONFIG)
    table = EdgeTable.load(run.file(RunDir.EDGES))
    if not run.file(RunDir.DERIVED).is_file() or any(e.decision is None for e in table.edges):
        raise FxadaptError(
            f"run {run.path} has not derived yet: let `fxadapt train` reach the end of the "
            "architecture stage first"
        )
    wrap_options = WrapOptions(**config["wrap"])
    _, wrapped = wrap_model(wrap_options, tuple(config["input_shape"]))
    _load_theta(wrapped, table)
    derived = api.derive(wrapped, {edge.id: edge.decision for edge in table.edges})
    state = run.load_tensors(RunDir.DERIVED)["state_dict"]
    derived.load_state_dict(state)
    return derived.eval(), table, config


def export_run(run_path: str | Path, format: str = "torchscript") -> Path:
    """Exports a run's derived module into the run directory and returns the file written."""
    derived, _, config = rebuild_derived(run_path)
    target = Path(run_path) / FORMAT_TO_FILENAME[format]
    return export(derived, target, _example_batch(tuple(config["input_shape"])), format=format)


def draw_run(
    run_path: str | Path,
    *,
    wrapped: torch.fx.GraphModule | None = None,
    table: EdgeTable | None = None,
) -> list[Path]:
    """Draws a run's cell types and whole network into its ``diagrams`` folder."""
    from fxadapt.draw import draw_cell_types, draw_network

    run = RunDir(run_path, create=False)
    if table is None:
        table = EdgeTable.load(run.file(RunDir.EDGES))
    if wrapped is None:
        config = run.read_json(RunDir.CONFIG)
        _, wrapped = wrap_model(WrapOptions(**config["wrap"]), tuple(config["input_shape"]))
    paths = draw_cell_types(table, run.diagrams)
    paths += draw_network(wrapped, table, run.diagrams)
    return paths


def _after_epoch(run: RunDir, trainer: Trainer, record: EpochRecord) -> None:
    run.append_metrics(record.to_dict())
    state = {
        "epoch": record.epoch,
        "stage": record.stage,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "decisions": None
        if trainer.derived is None
        else {str(edge.id): edge.decision for edge in trainer.table.edges},
    }
    run.save_tensors(RunDir.CHECKPOINT, state)


def _load_theta(wrapped: torch.fx.GraphModule, table: EdgeTable) -> None:
    mixed = wrapped.fxadapt_mixed
    with torch.no_grad():
        for edge in table.edges:
            for option, value in (edge.theta_values or {}).items():
                if option != "none":
                    getattr(mixed[edge.theta], f"theta_{option}").fill_(value)


def _check_classes(wrapped: torch.fx.GraphModule, data) -> None:
    example = _example_batch(data.input_shape)
    wrapped.eval()
    with torch.no_grad():
        outputs = wrapped(example)
    wrapped.train()
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if logits.dim() != 2 or logits.shape[1] != data.num_classes:
        raise FxadaptError(
            f"the model gives outputs of shape {tuple(logits.shape)} but {data.name} has "
            f"{data.num_classes} classes: pass --model-arg num_classes={data.num_classes}"
        )


def _example_batch(input_shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, *input_shape, generator=generator)
