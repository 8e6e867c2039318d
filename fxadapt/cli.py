"""The ``fxadapt`` command: wrap, train, export and draw.

Results go to standard output, errors and progress to standard error. An error the user can
fix is one line and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from fxadapt.allocator import keep_freed_memory
from fxadapt.analysis import GRANULARITIES
from fxadapt.data import DATASETS
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.export import FORMATS
from fxadapt.simclr import KNN_K, KNN_TEMPERATURE, TEMPERATURE
from fxadapt.trainer import ARCH_UPDATES, OPTIMIZERS, EpochRecord, TrainConfig, TrainProgress

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

stdout = Console()
stderr = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line and returns its exit status."""
    parser = build_parser()
    arguments, extras = parser.parse_known_args(argv)
    if extras:
        # The command's own parser reports unknown options, so the message names its help.
        command_parser = parser.command_parsers[arguments.command]
        command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
    _configure_logging(arguments.verbose, arguments.debug)
    try:
        arguments.handler(arguments)
    except KeyboardInterrupt as err:
        # A stop that saved a checkpoint carries its place and the command to continue.
        stderr.print(f"[red]error:[/red] interrupted{': ' + str(err) if str(err) else ''}")
        return 130
    except FxadaptError as err:
        return _fail(err, arguments.debug, status=2)
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure as one line
        return _fail(err, arguments.debug, status=1, unexpected=True)
    return 0


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as the other errors of the CLI are."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``fxadapt`` command."""
    parser = _Parser(
        prog="fxadapt",
        description="Adapt the architecture of a PyTorch network while it trains.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    common.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    parser.set_defaults(debug=False, verbose=False)
    commands = parser.add_subparsers(
        title="commands", required=True, metavar="COMMAND", dest="command"
    )
    parser.command_parsers = commands.choices

    wrap = commands.add_parser(
        "wrap", parents=[common], help="list a model's edges and draw its supernet"
    )
    _add_model_options(wrap)
    wrap.add_argument(
        "--input-shape",
        default="3,32,32",
        help="shape of one example input, channels first (default 3,32,32)",
    )
    wrap.add_argument("--out", help="folder for edges.json and the diagrams (default wrap-CLASS)")
    wrap.add_argument("--no-draw", action="store_true", help="skip the diagrams")
    wrap.set_defaults(handler=_wrap)

    train = commands.add_parser(
        "train", parents=[common], help="adapt and train a model, then export and draw it"
    )
    _add_model_options(train, optional=True)
    _add_data_options(train)
    _add_training_options(train)
    _add_objective_options(train)
    output = train.add_argument_group("output")
    output.add_argument("--out", help="run directory (default runs/CLASS-DATA)")
    output.add_argument(
        "--overwrite", action="store_true", help="replace a run directory that holds files"
    )
    output.add_argument(
        "--resume",
        metavar="RUN|auto",
        help="continue the run in folder RUN from its last checkpoint (MODEL and the options "
        "may be left out); auto: continue --out if it contains a checkpoint, else start it",
    )
    output.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        help="export format, repeatable (default torchscript)",
    )
    output.add_argument("--no-draw", action="store_true", help="skip the diagrams")
    output.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log metrics and theta to RUN/tensorboard (pip install 'fxadapt[tensorboard]')",
    )
    output.add_argument(
        "--theta-every",
        type=int,
        metavar="STEPS",
        help="architecture steps between two theta samples in theta.jsonl (default 10)",
    )
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", parents=[common], help="export a run's derived module")
    export.add_argument("run", help="run directory written by fxadapt train")
    export.add_argument(
        "--format", default="torchscript", choices=FORMATS, help="file format (default torchscript)"
    )
    export.set_defaults(handler=_export)

    report = commands.add_parser(
        "report", parents=[common], help="write a run's report.html with its plots"
    )
    report.add_argument("run", help="run directory written by fxadapt train")
    report.set_defaults(handler=_report)

    draw = commands.add_parser("draw", parents=[common], help="draw a run's diagrams again")
    draw.add_argument("run", help="run directory written by fxadapt train")
    draw.set_defaults(handler=_draw)
    return parser


def _add_model_options(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument(
        "model",
        nargs="?" if optional else None,
        help="path/to/file.py:Class or package.module:Class",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-arg",
        dest="model_args",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="constructor argument, repeatable; VALUE is a Python literal",
    )
    group.add_argument(
        "--granularity",
        default="branch",
        choices=GRANULARITIES,
        help="branch: edges end at additive merges (default); layer: also every conv or "
        "linear group",
    )
    group.add_argument(
        "--shortcuts",
        action="store_true",
        help="add new-shortcut edges, none at first, that training can turn into skips",
    )
    group.add_argument(
        "--scope",
        default="full",
        choices=("full", "cell"),
        help="full: a theta per edge; cell: a theta per edge position of a cell type",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", default="digits", choices=DATASETS, help="data set (default digits, embedded)"
    )
    group.add_argument("--data-dir", help="folder of the data set (not needed for digits)")
    group.add_argument("--train-limit", type=int, help="class-balanced subset of N training images")
    group.add_argument("--test-limit", type=int, help="class-balanced subset of N test images")
    group.add_argument(
        "--cutout",
        type=int,
        metavar="PIXELS",
        help="side of the Cutout square in training images, 0 for none (default: the "
        "model's training defaults, else 0)",
    )


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=int,
        default=defaults.epochs,
        help=f"total epochs (default {defaults.epochs})",
    )
    group.add_argument(
        "--arch-epochs",
        type=int,
        default=defaults.arch_epochs,
        help=f"epochs of the architecture stage (default {defaults.arch_epochs})",
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"images per batch (default {defaults.batch_size})",
    )
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="optimizer of the weights (default sgd; adam with --objective simclr)",
    )
    group.add_argument(
        "--lr",
        type=float,
        help=f"learning rate of the weights (default {defaults.lr} for sgd, 0.001 for adam)",
    )
    group.add_argument(
        "--arch-lr",
        type=float,
        default=defaults.arch_lr,
        help=f"learning rate of theta, Adam (default {defaults.arch_lr})",
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=defaults.weight_decay,
        help=f"weight decay of the weights (default {defaults.weight_decay})",
    )
    group.add_argument(
        "--arch-update",
        default=defaults.arch_update,
        choices=ARCH_UPDATES,
        help="alternate: weight step then theta step on each batch (the method, default); "
        "joint: both from one backward pass (faster, a deviation)",
    )
    group.add_argument(
        "--arch-every",
        type=int,
        default=defaults.arch_every,
        metavar="K",
        help="take a theta step on every K-th batch (default 1)",
    )
    group.add_argument(
        "--grad-clip",
        type=float,
        default=defaults.grad_clip,
        help=f"maximum gradient norm of the weights, 0 for none (default {defaults.grad_clip})",
    )
    group.add_argument(
        "--drop-path",
        type=float,
        metavar="P",
        help="drop-path probability reached at the last epoch, ramped from 0 (default: the "
        "model's training defaults, else 0)",
    )
    group.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default 0)")
    group.add_argument("--device", help=f"cpu, cuda or cuda:N (default {defaults.device})")
    group.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep memory that tensors free in the process for the next step instead of "
        "returning it to the system, which saves page faults on the CPU (glibc only; "
        "default on)",
    )


def _add_objective_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("objective")
    group.add_argument(
        "--objective",
        default="supervised",
        choices=("supervised", "simclr"),
        help="supervised: cross-entropy (default); simclr: self-supervised, adapts the backbone",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=TEMPERATURE,
        help=f"NT-Xent temperature of simclr, a positive number (default {TEMPERATURE})",
    )
    group.add_argument(
        "--knn-k",
        type=int,
        default=KNN_K,
        metavar="K",
        help=f"training images that vote in the kNN monitor of simclr (default {KNN_K})",
    )
    group.add_argument(
        "--knn-temperature",
        type=float,
        default=KNN_TEMPERATURE,
        help=f"temperature of the kNN monitor's vote weights (default {KNN_TEMPERATURE})",
    )
    group.add_argument(
        "--feature-node",
        metavar="NAME",
        help="traced node whose value simclr takes as features (default: the input of the "
        "last nn.Linear)",
    )


def _wrap(arguments: argparse.Namespace) -> None:
    from fxadapt.api import edge_table
    from fxadapt.loading import parse_model_args
    from fxadapt.report import edge_table_view
    from fxadapt.run import WrapOptions, wrap_model

    input_shape = _parse_shape(arguments.input_shape)
    options = WrapOptions(
        model=arguments.model,
        model_args=parse_model_args(arguments.model_args),
        granularity=arguments.granularity,
        scope=arguments.scope,
        shortcuts=arguments.shortcuts,
    )
    _, wrapped = wrap_model(options, input_shape)
    table = edge_table(wrapped)
    stdout.print(edge_table_view(table, title=f"Edges of {arguments.model}"))
    _print_cells(table)
    out = Path(arguments.out or f"wrap-{arguments.model.rpartition(':')[2]}")
    out.mkdir(parents=True, exist_ok=True)
    table.save(out / "edges.json")
    stdout.print(f"edge table: {out / 'edges.json'}")
    if not arguments.no_draw:
        from fxadapt.draw import draw_cell_types, draw_network

        paths = draw_cell_types(table, out) + draw_network(wrapped, table, out, name="supernet")
        stdout.print("diagrams: " + ", ".join(str(path) for path in paths if path.suffix == ".svg"))


def _train(arguments: argparse.Namespace) -> None:
    from fxadapt.loading import parse_model_args
    from fxadapt.run import RunOptions, WrapOptions

    if arguments.keep_freed_memory:
        keep_freed_memory()
    resume, resume_out = _resume_request(arguments)
    if arguments.model is None:
        _train_and_show(_with_resume_overrides(_saved_run_options(resume, resume_out), arguments))
        return
    class_name = arguments.model.rpartition(":")[2]
    out = resume_out or arguments.out or f"runs/{class_name}-{arguments.data}"
    options = RunOptions(
        wrap=WrapOptions(
            model=arguments.model,
            model_args=parse_model_args(arguments.model_args),
            granularity=arguments.granularity,
            scope=arguments.scope,
            shortcuts=arguments.shortcuts,
            feature_node=arguments.feature_node,
        ),
        out=out,
        data=arguments.data,
        data_dir=arguments.data_dir,
        train_limit=arguments.train_limit,
        test_limit=arguments.test_limit,
        train=TrainConfig(
            epochs=arguments.epochs,
            arch_epochs=arguments.arch_epochs,
            batch_size=arguments.batch_size,
            optimizer=arguments.optimizer,
            lr=arguments.lr,
            arch_lr=arguments.arch_lr,
            weight_decay=arguments.weight_decay,
            arch_update=arguments.arch_update,
            arch_every=arguments.arch_every,
            grad_clip=arguments.grad_clip or None,
            drop_path=arguments.drop_path,
            seed=arguments.seed,
            device=arguments.device or TrainConfig.device,
        ),
        formats=tuple(arguments.formats or ("torchscript",)),
        overwrite=arguments.overwrite,
        resume=resume,
        cutout=arguments.cutout,
        tensorboard=arguments.tensorboard,
        theta_every=RunOptions.theta_every
        if arguments.theta_every is None
        else arguments.theta_every,
        draw=not arguments.no_draw,
        objective=arguments.objective,
        temperature=arguments.temperature,
        knn_k=arguments.knn_k,
        knn_temperature=arguments.knn_temperature,
    )
    _train_and_show(options)


def _train_and_show(options) -> None:
    from fxadapt.distributed import rank_from_environment
    from fxadapt.report import cost_table_view, edge_table_view
    from fxadapt.run import train_run

    if rank_from_environment() != 0:
        # Under torchrun only rank 0 shows progress and results.
        train_run(options, TrainProgress())
        return
    out = options.out
    metric = "kNN accuracy" if options.objective == "simclr" else "test accuracy"
    with _RichProgress(metric) as progress:
        report = train_run(options, progress)

    from fxadapt.edges import EdgeTable as Table

    table = Table.load(Path(out) / "edges.json")
    stdout.print(edge_table_view(table, title="Edge decisions"))
    stdout.print(cost_table_view(report["costs"]))
    accuracy = report["accuracy"]["test"]
    stdout.print(
        f"{report['accuracy']['metric']} {100 * accuracy:.2f}%; "
        f"{report['summary']['changed']} of {report['summary']['edges']} edges changed"
    )
    written = [
        name
        for name in ("report.html", "report.md", "model.ts", "model.pt2", "model.onnx", "diagrams")
        if (Path(out) / name).exists()
    ]
    stdout.print(f"run directory: {out} ({', '.join(written)})")


def _resume_request(arguments: argparse.Namespace) -> tuple[str, str | None]:
    """Returns the resume mode (no, yes or auto) and the run directory that --resume names."""
    if arguments.resume is None:
        return "no", None
    if arguments.resume == "auto":
        return "auto", None
    if arguments.out is not None and Path(arguments.out) != Path(arguments.resume):
        raise FxadaptError(
            f"--resume {arguments.resume} and --out {arguments.out} name different run "
            "directories: pass the run directory once, with --resume"
        )
    return "yes", arguments.resume


def _with_resume_overrides(options, arguments: argparse.Namespace):
    """Returns the saved options with those a resume may change taken from the command line."""
    import dataclasses

    changes = {}
    if arguments.data_dir is not None:
        changes["data_dir"] = arguments.data_dir
    if arguments.formats:
        changes["formats"] = tuple(arguments.formats)
    if arguments.no_draw:
        changes["draw"] = False
    if arguments.tensorboard:
        changes["tensorboard"] = True
    if arguments.theta_every is not None:
        changes["theta_every"] = arguments.theta_every
    if arguments.device is not None:
        changes["train"] = dataclasses.replace(options.train, device=arguments.device)
    return dataclasses.replace(options, **changes)


def _saved_run_options(resume: str, out: str | None):
    """Returns the options in the config.json of the run that --resume names."""
    import dataclasses
    import json

    from fxadapt.run import RunOptions
    from fxadapt.rundir import RunDir

    if resume != "yes":
        raise FxadaptError(
            "MODEL is missing: name the model to train (path/to/file.py:Class), or pass "
            "--resume RUN to continue the run in folder RUN"
        )
    config_file = Path(out) / RunDir.CONFIG
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError as err:
        raise FxadaptError(
            f"cannot resume {out}: {RunDir.CONFIG} not found there; pass the --out folder "
            "of an earlier `fxadapt train`"
        ) from err
    except (OSError, ValueError) as err:
        raise FxadaptError(f"{config_file} cannot be read ({err}): pass a run directory") from err
    options = RunOptions.from_dict(config)
    return dataclasses.replace(options, out=out, resume="yes", overwrite=False)


def _report(arguments: argparse.Namespace) -> None:
    from fxadapt.html_report import build_html_report

    stdout.print(f"wrote {build_html_report(arguments.run)}")


def _export(arguments: argparse.Namespace) -> None:
    from fxadapt.run import export_run

    path = export_run(arguments.run, arguments.format)
    stdout.print(f"wrote {path}")


def _draw(arguments: argparse.Namespace) -> None:
    from fxadapt.run import draw_run

    paths = draw_run(arguments.run)
    stdout.print("\n".join(str(path) for path in paths))


def _print_cells(table: EdgeTable) -> None:
    groups = len(table.theta_groups())
    stdout.print(
        f"{len(table.edges)} edges, {groups} theta groups ({table.scope} scope), "
        f"{sum('identity' in edge.options for edge in table.edges)} allow identity, "
        f"{sum('none' in edge.options for edge in table.edges)} allow none"
    )
    for name, cells in table.cell_types.items():
        cells = [cell or "(root)" for cell in cells]
        stdout.print(
            f"cell type {name}: {len(cells)} cells ({', '.join(cells[:4])}"
            f"{', ...' if len(cells) > 4 else ''})"
        )
    for path, reason in table.leaves.items():
        stdout.print(f"leaf {path}: {reason}")


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise FxadaptError(f"invalid --input-shape {text!r}: write positive sizes like 3,32,32")
    return shape


class _RichProgress(TrainProgress):
    """Shows one progress bar per epoch with the running loss, accuracy and speed.

    Args:
        metric: what the evaluation's ``test_accuracy`` is called after each epoch.
    """

    def __init__(self, metric: str = "test accuracy"):
        self.metric = metric

    def __enter__(self):
        self.bar = None
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.__exit__(*exc_info)

    def _start(self) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f} {task.fields[accuracy]}"),
            TextColumn("{task.fields[speed]:.0f} img/s"),
            TimeElapsedColumn(),
            console=stderr,
        )
        self.bar.__enter__()

    def epoch_started(self, stage: str, epoch: int, epochs: int, batches: int) -> None:
        if self.bar is None:
            self._start()
        self.task = self.bar.add_task(
            f"{stage:<12} epoch {epoch + 1}/{epochs}",
            total=batches,
            loss=0.0,
            accuracy="",
            speed=0.0,
        )

    def batch_done(self, loss: float, accuracy: float, images_per_second: float) -> None:
        shown = "" if accuracy is None else f"acc {accuracy:.1%}"
        self.bar.update(self.task, advance=1, loss=loss, accuracy=shown, speed=images_per_second)

    def epoch_done(self, record: EpochRecord) -> None:
        measured = []
        if record.test_accuracy is not None:
            measured.append(f"{self.metric} {record.test_accuracy:.2%}")
        if record.test_loss is not None:
            measured.append(f"test loss {record.test_loss:.3f}")
        self.bar.console.print(
            f"epoch {record.epoch} ({record.stage}): " + (", ".join(measured) or "done")
        )

    def derived(self, table: EdgeTable) -> None:
        if self.bar is None:
            # Derivation before the first epoch: --arch-epochs 0, or a resumed network stage.
            self._start()
        changed = [edge for edge in table.edges if edge.changed]
        self.bar.console.print(
            f"derived: {len(changed)} of {len(table.edges)} edges changed"
            + "".join(f"; {edge.name} {edge.decision}" for edge in changed[:8])
        )


def _configure_logging(verbose: bool, debug: bool) -> None:
    from fxadapt.distributed import rank_from_environment

    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    if rank_from_environment() != 0 and not debug:
        # Under torchrun, processes other than rank 0 log errors only.
        level = logging.ERROR
    handler = RichHandler(console=stderr, show_time=False, show_path=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # torch's C++ extension helper warns on every CPU-only machine that it found no CUDA.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _fail(err: BaseException, debug: bool, *, status: int, unexpected: bool = False) -> int:
    if debug:
        stderr.print_exception()
    message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if unexpected:
        message = f"{type(err).__name__}: {message} (rerun with --debug for the traceback)"
    stderr.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
