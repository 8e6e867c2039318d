"""The main job as functions the CLI calls: train a run, rebuild it, export it, draw it.

A run directory holds everything needed to rebuild the derived module without pickled
modules: the configuration (model specification, its arguments, the wrap options and the
input shape), the edge table with decisions and theta, and the derived weights.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.fx
from torch.utils.data import DataLoader

from fxadapt import api
from fxadapt.checkpoint import Checkpointer, read_checkpoint
from fxadapt.costs import compare_costs
from fxadapt.data import load_data, make_loaders
from fxadapt.distributed import Parallelism, start_process_group
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.export import FORMAT_TO_FILENAME, check_export_packages, export
from fxadapt.html_report import ThetaLog, build_html_report
from fxadapt.loading import build_model, load_model_class
from fxadapt.passes import cut_backbone
from fxadapt.report import build_report, write_report
from fxadapt.resume import RunStart, plan_run_start
from fxadapt.rundir import RunDir
from fxadapt.simclr import KNN_K, KNN_TEMPERATURE, TEMPERATURE, SimCLR, two_view_bundle
from fxadapt.tensorboard import TensorBoardLog
from fxadapt.tracing import trace
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
        shortcuts: add new-shortcut edges.
        backbone: cut the model at its features before wrapping, so that it outputs them.
        feature_node: name of the node whose value the backbone outputs, or None for the
            input of the last ``nn.Linear``.
    """

    model: str
    model_args: dict = field(default_factory=dict)
    granularity: str = "branch"
    scope: str = "full"
    shortcuts: bool = False
    backbone: bool = False
    feature_node: str | None = None


def _objective_picks_optimizer() -> TrainConfig:
    # None leaves the weight optimizer and its learning rate to the objective.
    return TrainConfig(optimizer=None, lr=None)


@dataclass
class RunOptions:
    """Everything ``fxadapt train`` needs; saved as ``config.json``."""

    wrap: WrapOptions
    out: str
    data: str = "digits"
    data_dir: str | None = None
    train_limit: int | None = None
    test_limit: int | None = None
    train: TrainConfig = field(default_factory=_objective_picks_optimizer)
    formats: tuple[str, ...] = ("torchscript",)
    # None takes the model class's ``training_defaults`` (the zoo's NAS networks train with
    # Cutout 16 and DARTS with drop path 0.2), else 0.
    cutout: int | None = None
    tensorboard: bool = False
    theta_every: int = 10
    overwrite: bool = False
    draw: bool = True
    # ``supervised`` or ``simclr``. A SimCLR run adapts the backbone (``wrap.backbone``).
    # ``train.optimizer`` and ``train.lr`` left as None take the objective's defaults: sgd
    # at 0.025 for supervised, adam at 1e-3 for simclr. A given optimizer without a given
    # lr takes that optimizer's default lr.
    objective: str = "supervised"
    temperature: float = TEMPERATURE
    knn_k: int = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    # ``no``, ``yes`` or ``auto``: whether to continue the run in ``out`` (fxadapt.resume).
    resume: str = "no"

    def check(self) -> None:
        """Raises FxadaptError for settings that would fail only after the run has started."""
        self.train.check()
        if self.theta_every < 1:
            raise FxadaptError(f"--theta-every must be at least 1 step, got {self.theta_every}")
        if self.objective == "simclr":
            if self.knn_k < 1:
                raise FxadaptError(f"--knn-k must be at least 1, got {self.knn_k}")
            for option, value in (
                ("--temperature", self.temperature),
                ("--knn-temperature", self.knn_temperature),
            ):
                if not value > 0:
                    raise FxadaptError(f"{option} must be positive, got {value}")
        for format in self.formats:
            check_export_packages(format)

    def to_dict(self) -> dict:
        """Returns the options as plain data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunOptions:
        """Returns the options saved in a run's ``config.json``.

        Raises:
            FxadaptError: when the file contains settings this fxadapt does not know.
        """
        names = {option.name for option in fields(cls)}
        values = {name: value for name, value in data.items() if name in names}
        train = dict(data["train"])
        train["arch_betas"] = tuple(train["arch_betas"])
        values["formats"] = tuple(values.get("formats", ("torchscript",)))
        try:
            values["wrap"] = WrapOptions(**data["wrap"])
            values["train"] = TrainConfig(**train)
            return cls(**values)
        except TypeError as err:
            raise FxadaptError(
                f"the run's configuration has settings this fxadapt does not know ({err}): "
                "resume it with the fxadapt that started it"
            ) from err


def wrap_model(
    options: WrapOptions, input_shape: tuple[int, ...]
) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """Builds the model of ``options`` and wraps it on an example batch of ``input_shape``.

    Returns:
        The original model (its backbone when ``options.backbone`` is set) and the wrapped
        one.
    """
    model = build_model(options.model, options.model_args)
    if options.backbone:
        model = cut_backbone(trace(model).graph_module, options.feature_node)
    example = _example_batch(input_shape)
    wrapped = api.wrap(
        model,
        example,
        granularity=options.granularity,
        scope=options.scope,
        shortcuts=options.shortcuts,
        name=options.model,
    )
    return model, wrapped


def train_run(options: RunOptions, progress: TrainProgress | None = None) -> dict | None:
    """Trains, derives, exports and draws one run, or resumes it; returns its report.

    Under torchrun every process calls this; rank 0 writes the run directory and returns
    the report, the others return None.

    Raises:
        FxadaptError: for bad input, with a message that says what to change.
        KeyboardInterrupt: after SIGINT or SIGTERM stopped training and saved a checkpoint.
    """
    options = _with_model_defaults(_with_objective_defaults(options))
    options.check()
    parallel = start_process_group(options.train.device)
    try:
        return _train_run(options, progress, parallel)
    finally:
        parallel.close()


def _train_run(
    options: RunOptions, progress: TrainProgress | None, parallel: Parallelism
) -> dict | None:
    start = parallel.run_on_main(lambda: plan_run_start(options))
    resolve_device(options.train.device)
    data = load_data(
        options.data,
        options.data_dir,
        train_limit=options.train_limit,
        test_limit=options.test_limit,
        seed=options.train.seed,
        cutout=options.cutout,
    )
    torch.manual_seed(options.train.seed)
    model, wrapped = wrap_model(options.wrap, data.input_shape)
    if options.objective == "simclr":
        outputs = _feature_shape(wrapped, data.input_shape)
    else:
        _check_classes(wrapped, data)
        outputs = None

    config = options.to_dict()
    config["input_shape"] = list(data.input_shape)
    config["num_classes"] = data.num_classes
    config["versions"] = {"torch": torch.__version__, "python": platform.python_version()}
    run = _open_run(options, start, config, wrapped) if parallel.is_main else None

    objective = None
    if options.objective == "simclr":
        train_loader, test_loader, objective = _simclr_training(data, options, outputs)
    else:
        train_loader, test_loader = make_loaders(
            data, options.train.batch_size, seed=options.train.seed
        )
    train_loader = parallel.shard_loader(train_loader, options.train.seed)
    checkpointer = Checkpointer(run, parallel, train_loader)
    tensorboard = TensorBoardLog(run.path) if options.tensorboard and run is not None else None
    theta_log = None
    if run is not None:
        theta_log = ThetaLog(
            run.path,
            every=options.theta_every,
            on_sample=None if tensorboard is None else tensorboard.log_theta,
        )

    def after_epoch(trainer: Trainer, record: EpochRecord) -> None:
        checkpointer.after_epoch(trainer, record)
        if tensorboard is not None:
            tensorboard.log_epoch(record)

    trainer = Trainer(
        wrapped,
        train_loader,
        test_loader,
        parallel.process_config(options.train),
        objective=objective,
        progress=progress,
        on_epoch=after_epoch,
        on_step=theta_log,
        parallel=parallel,
    )
    if start.checkpoint is not None:
        checkpointer.restore(trainer, start.checkpoint)
    try:
        with checkpointer.stop_on_signal(trainer):
            result = trainer.fit()
    finally:
        if tensorboard is not None:
            tensorboard.close()
    if run is None:
        return None
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
        **_objective_labels(options, data, outputs),
    )
    write_report(run, report)
    build_html_report(run.path)
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
        raise FxadaptError(_unfinished_run_message(run, config))
    wrap_options = WrapOptions(**config["wrap"])
    _, wrapped = wrap_model(wrap_options, tuple(config["input_shape"]))
    _load_theta(wrapped, table)
    derived = api.derive(wrapped, {edge.id: edge.decision for edge in table.edges})
    state = run.load_tensors(RunDir.DERIVED)["state_dict"]
    derived.load_state_dict(state)
    return derived.eval(), table, config


def _unfinished_run_message(run: RunDir, config: dict) -> str:
    """Says why a run has no derived module to rebuild and how to get one."""
    resume = f"`fxadapt train --resume {run.path}`"
    if not run.file(RunDir.CHECKPOINT).is_file():
        return (
            f"run {run.path} has not derived yet and has no checkpoint: start it again with "
            "`fxadapt train --overwrite`, then export"
        )
    checkpoint = read_checkpoint(run)
    epochs = config["train"]["epochs"]
    if checkpoint["decisions"] is None:
        return (
            f"run {run.path} has not derived yet: it stopped in the architecture stage after "
            f"epoch {checkpoint['epoch']} of {epochs}; continue it with {resume}, then export"
        )
    return (
        f"run {run.path} derived its network but stopped after epoch {checkpoint['epoch']} of "
        f"{epochs}, and derived.pt is written when training ends: continue it with {resume}, "
        "then export"
    )


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


def _open_run(
    options: RunOptions, start: RunStart, config: dict, wrapped: torch.fx.GraphModule
) -> RunDir:
    """Creates, empties or reopens the run directory, according to ``start``."""
    if start.checkpoint is not None:
        run = RunDir(options.out, create=False)
        # The epochs after the checkpoint are trained again, so their metrics lines go.
        lines = [json.dumps(record) + "\n" for record in start.checkpoint["history"]]
        run.write_text(RunDir.METRICS, "".join(lines))
        return run
    run = RunDir(options.out, overwrite=start.replace)
    run.write_json(RunDir.CONFIG, config)
    api.edge_table(wrapped).save(run.file(RunDir.EDGES))
    return run


def _load_theta(wrapped: torch.fx.GraphModule, table: EdgeTable) -> None:
    mixed = wrapped.fxadapt_mixed
    with torch.no_grad():
        for edge in table.edges:
            for option, value in (edge.theta_values or {}).items():
                if option != "none":
                    getattr(mixed[edge.theta], f"theta_{option}").fill_(value)


OBJECTIVES = ("supervised", "simclr")

# Optimizer of the weights per objective, and learning rate per optimizer, for runs that set
# neither. Adam at 1e-3 for SimCLR is the method's setting.
_OBJECTIVE_TO_OPTIMIZER = {"supervised": "sgd", "simclr": "adam"}
_OPTIMIZER_TO_LR = {"sgd": TrainConfig.lr, "adam": 1e-3}


def _with_model_defaults(options: RunOptions) -> RunOptions:
    """Returns a copy of ``options`` with the model class's training defaults filled in.

    A model class may declare ``training_defaults``, a dict with ``cutout`` (pixels) and
    ``drop_path`` (the highest drop-path probability); options the user set win.
    """
    defaults = getattr(load_model_class(options.wrap.model), "training_defaults", {})
    train = options.train
    if train.drop_path is None:
        train = replace(train, drop_path=float(defaults.get("drop_path", 0.0)))
    cutout = options.cutout
    if cutout is None:
        cutout = int(defaults.get("cutout", 0))
    return replace(options, train=train, cutout=cutout)


def _with_objective_defaults(options: RunOptions) -> RunOptions:
    """Returns a copy of ``options`` with the settings that follow from its objective."""
    if options.objective not in OBJECTIVES:
        raise FxadaptError(
            f"invalid --objective {options.objective!r}: use one of {', '.join(OBJECTIVES)}"
        )
    if options.wrap.feature_node is not None and options.objective != "simclr":
        raise FxadaptError(
            f"--feature-node {options.wrap.feature_node} applies to self-supervised runs "
            "only: add --objective simclr or drop --feature-node"
        )
    optimizer = options.train.optimizer or _OBJECTIVE_TO_OPTIMIZER[options.objective]
    lr = options.train.lr if options.train.lr is not None else _OPTIMIZER_TO_LR.get(optimizer)
    train = replace(options.train, optimizer=optimizer, lr=lr)
    wrap = replace(options.wrap, backbone=options.wrap.backbone or options.objective == "simclr")
    return replace(options, train=train, wrap=wrap)


def _feature_shape(wrapped: torch.fx.GraphModule, input_shape: tuple[int, ...]) -> list[int]:
    """Returns the shape of one sample's features, as the backbone outputs them."""
    wrapped.eval()
    with torch.no_grad():
        features = wrapped(_example_batch(input_shape))
    wrapped.train()
    if isinstance(features, (tuple, list)):
        features = features[0]
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise FxadaptError(
            f"the backbone outputs {shape}, not one feature vector per sample: name a node "
            "with a batch dimension and at least one feature dimension in --feature-node"
        )
    return list(features.shape[1:])


def _simclr_training(data, options: RunOptions, feature_shape: list[int]):
    """Returns the two-view train loader, the test loader and the SimCLR objective."""
    batch_size = options.train.batch_size
    two_views = two_view_bundle(data)
    # NT-Xent needs two images or more per batch, so the last, incomplete batch is dropped
    # unless it is the only batch.
    train_loader, test_loader = make_loaders(
        two_views,
        batch_size,
        seed=options.train.seed,
        drop_last=len(two_views.train) > batch_size,
    )
    bank_loader = DataLoader(data.train_plain, batch_size=batch_size, shuffle=False)
    objective = SimCLR(
        bank_loader,
        math.prod(feature_shape),
        temperature=options.temperature,
        knn_k=options.knn_k,
        knn_temperature=options.knn_temperature,
    )
    return train_loader, test_loader, objective


def _objective_labels(options: RunOptions, data, feature_shape: list[int] | None) -> dict:
    """Returns what the report calls the run's accuracy and the exported module's output."""
    if options.objective == "simclr":
        if len(feature_shape) == 1:
            features = f"{feature_shape[0]}-d"
        else:
            features = "of shape " + "x".join(str(size) for size in feature_shape)
        return {
            "metric": f"kNN accuracy (k={min(options.knn_k, len(data.train))})",
            "exported": f"backbone features, {features}",
        }
    return {"metric": "test accuracy", "exported": f"logits, {data.num_classes} classes"}


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
