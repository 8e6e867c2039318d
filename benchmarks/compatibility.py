"""Run every torchvision classifier and one model of every timm family through fxadapt's chain.

    python benchmarks/compatibility.py                       # everything, a few hours on 2 cores
    python benchmarks/compatibility.py --library torchvision --only "resnet*"
    python benchmarks/compatibility.py --resume --limit 20   # the next 20 models without a row

Each model is built with random weights, 10 classes and the smallest input size it accepts.
The chain in ``compatibility_chain.py`` then runs on it: wrap, one weight and one theta step,
a derivation forced to one identity and one none decision where the edge table allows them,
and export to every format, each file checked against the derived module. Each model runs in
a worker process with a time limit and a memory limit.

Results go to ``docs/compatibility.json`` after every model, and the table
``docs/compatibility.md`` is rewritten from all the rows in it, so runs can be split into
chunks and resumed.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from compatibility_chain import PASS, ChainResult, run_chain, short_reason
from compatibility_models import (
    LIBRARIES,
    ModelSpec,
    build_model,
    choose_input_size,
    smallest_timm_model,
    timm_modules,
    torchvision_specs,
)
from compatibility_table import write_markdown
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fxadapt.export import FORMATS

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPOSITORY / "docs" / "compatibility.md"
VERSION_PACKAGES = (
    "torch",
    "torchvision",
    "timm",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "fxadapt",
)

stdout = Console()
stderr = Console(stderr=True)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM (from ``timeout`` or ``kill``) becomes an exit that stops the worker too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    options = _parse_arguments(argv)
    command = shlex.join(["python", "benchmarks/compatibility.py", *(argv or sys.argv[1:])])
    json_path = options.output.with_suffix(".json")
    results = _load_results(json_path)

    specs = _select_specs(options, results)
    if not specs:
        stderr.print("no model matches the selection: check --library, --only and --resume")
        return 1
    results["commands"] = [*dict.fromkeys([*results["commands"], command])]
    stdout.print(f"{len(specs)} models; results go to {json_path} and {options.output}")
    stdout.print(f"worker output goes to {options.log}")

    passed = _run_all(specs, options, results, json_path)
    stdout.print(f"{passed} of {len(specs)} models passed the chain through TorchScript")
    return 0


def _parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    selection = parser.add_argument_group("selection")
    selection.add_argument(
        "--library",
        action="append",
        choices=LIBRARIES,
        help="library to run (repeatable; default: both)",
    )
    selection.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="shell pattern on the row name (torchvision/BUILDER, timm/MODULE) or its last part "
        "(repeatable)",
    )
    selection.add_argument(
        "--resume", action="store_true", help="skip models that already have a row"
    )
    selection.add_argument("--limit", type=int, help="run at most this many models")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--timeout", type=float, default=900.0, help="time limit per model, in seconds"
    )
    run.add_argument(
        "--memory-limit",
        type=float,
        default=12.0,
        help="memory limit of the worker process, in GiB",
    )
    run.add_argument("--threads", type=int, help="torch threads per model (default: torch's)")
    run.add_argument("--classes", type=int, default=10, help="classes of every classifier")
    run.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        help="export format to check (repeatable; default: all)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="the Markdown table; the JSON rows go beside it with the suffix .json",
    )
    output.add_argument(
        "--log",
        type=Path,
        default=Path(tempfile.gettempdir()) / "fxadapt-compatibility.log",
        help="file that receives the workers' output and tracebacks",
    )

    options = parser.parse_args(argv)
    options.library = options.library or list(LIBRARIES)
    options.formats = tuple(options.formats or FORMATS)
    return options


def _load_results(json_path: Path) -> dict:
    """Returns the saved results, or empty ones when there are none or the versions changed."""
    versions = library_versions()
    empty = {"commands": [], "versions": versions, "timm_smallest": {}, "rows": {}}
    if not json_path.is_file():
        return empty
    saved = json.loads(json_path.read_text())
    if saved.get("versions") != versions:
        stderr.print(
            f"{json_path} was made with other library versions ({saved.get('versions')}); "
            "starting a new table"
        )
        return empty
    return saved


def library_versions() -> dict[str, str]:
    """Returns the versions of Python and of every package the results depend on."""
    versions = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _select_specs(options: argparse.Namespace, results: dict) -> list[ModelSpec]:
    specs = []
    if "torchvision" in options.library:
        specs += [spec for spec in torchvision_specs() if _matches(spec, options.only)]
    if "timm" in options.library:
        specs += _timm_specs(options.only, results)
    if options.resume:
        specs = [spec for spec in specs if spec.key not in results["rows"]]
    if options.limit is not None:
        specs = specs[: options.limit]
    return specs


def _matches(spec: ModelSpec, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(
        fnmatch.fnmatch(spec.key, pattern) or fnmatch.fnmatch(spec.family, pattern)
        for pattern in patterns
    )


def _timm_specs(patterns: list[str] | None, results: dict) -> list[ModelSpec]:
    """Returns one spec per timm module, with its smallest model (cached in the results)."""
    try:
        modules = timm_modules()
    except ImportError:
        stderr.print("timm is not installed, so its families are left out: pip install timm")
        return []
    modules = [module for module in modules if _matches(ModelSpec("timm", module, ""), patterns)]
    cache = results["timm_smallest"]
    missing = [module for module in modules if module not in cache]
    if missing:
        with _progress() as progress:
            task = progress.add_task(
                "choosing each timm family's smallest model", total=len(missing)
            )
            for module in missing:
                progress.update(task, description=f"smallest model of timm/{module}")
                name, parameters = smallest_timm_model(module)
                cache[module] = {"model": name, "parameters": parameters}
                progress.advance(task)
    return [ModelSpec("timm", module, cache[module]["model"]) for module in modules]


def _progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stdout,
    )


def _run_all(
    specs: list[ModelSpec], options: argparse.Namespace, results: dict, json_path: Path
) -> int:
    """Runs every spec in a worker, saving the results after each; returns how many passed."""
    options.log.parent.mkdir(parents=True, exist_ok=True)
    worker = _Worker(options)
    passed = 0
    try:
        with _progress() as progress:
            task = progress.add_task("", total=len(specs))
            for spec in specs:
                progress.update(task, description=spec.key)
                row = worker.run(spec)
                results["rows"][spec.key] = row
                _save(results, json_path, options.output)
                passed += row["status"] == "pass"
                style = "green" if row["status"] == "pass" else "red"
                progress.console.print(
                    f"[{style}]{spec.key}[/] ({row['model']}, {row['seconds']:.0f} s): "
                    f"{row['status']}",
                    markup=True,
                    highlight=False,
                )
                progress.advance(task)
    finally:
        worker.stop()
    return passed


def _save(results: dict, json_path: Path, markdown_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = json_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, json_path)
    write_markdown(results, markdown_path)


class _Worker:
    """A process that runs the chain on one model at a time, restarted after a timeout or crash.

    The worker is a separate interpreter (the ``spawn`` start method), so a model that hangs,
    crashes or runs out of memory takes down only the worker, and its output stays out of the
    progress display.
    """

    def __init__(self, options: argparse.Namespace):
        self.options = options
        self.context = multiprocessing.get_context("spawn")
        self.process = None
        self.connection = None

    def run(self, spec: ModelSpec) -> dict:
        """Returns the row of ``spec``; a timeout or crash becomes the row's status."""
        if self.process is None:
            self._start()
        start = time.perf_counter()
        self.connection.send(spec.to_dict())
        status = ""
        if not self.connection.poll(self.options.timeout):
            status = f"timed out after {self.options.timeout:g} s"
        else:
            try:
                row = self.connection.recv()
            except EOFError:
                self.process.join(timeout=10)
                status = f"the worker process died (exit code {self.process.exitcode})"
            else:
                # A failure can leave the worker short of memory (after the memory limit) or
                # with broken state, so the next model starts in a new worker.
                if row["status"] != "pass":
                    self.stop()
                return row
        self.stop()
        return {
            **_empty_row(spec),
            "failure": status,
            "status": status,
            "seconds": time.perf_counter() - start,
        }

    def stop(self) -> None:
        """Ends the worker process: it is asked to leave, and killed if it does not."""
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()
        self.process = None
        self.connection = None

    def _start(self) -> None:
        parent_end, child_end = self.context.Pipe()
        settings = {
            "classes": self.options.classes,
            "formats": self.options.formats,
            "threads": self.options.threads,
            "memory_limit": self.options.memory_limit,
            "log": str(self.options.log),
        }
        self.process = self.context.Process(
            target=_serve, args=(child_end, settings), name="fxadapt-compatibility", daemon=True
        )
        self.process.start()
        child_end.close()
        self.connection = parent_end


def _empty_row(spec: ModelSpec) -> dict:
    return {
        "key": spec.key,
        "library": spec.library,
        "family": spec.family,
        "model": spec.name,
        "input_size": spec.input_size,
        "build_kwargs": spec.build_kwargs,
        **ChainResult().to_dict(),
    }


def _serve(connection, settings: dict) -> None:
    """Runs in the worker: receives specs and sends back rows until it receives None."""
    limit = int(settings["memory_limit"] * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    log = open(settings["log"], "a", buffering=1)  # noqa: SIM115 - open for the process's life
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    logging.basicConfig(
        stream=log, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    warnings.simplefilter("ignore")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    while True:
        message = connection.recv()
        if message is None:
            return
        spec = ModelSpec(**message)
        print(f"===== {spec.key} ({spec.name})", flush=True)
        connection.send(evaluate(spec, settings["classes"], settings["formats"]))


def evaluate(spec: ModelSpec, num_classes: int, formats: tuple[str, ...]) -> dict:
    """Builds the model of ``spec`` at its smallest input size and runs the chain on it.

    Returns:
        The row: the spec, the chain's results, ``status`` (``pass``, or what failed before
        TorchScript export or in it) and ``seconds``.
    """
    start = time.perf_counter()
    row = _empty_row(spec)
    try:
        spec = choose_input_size(spec, num_classes)
        torch.manual_seed(0)
        model = build_model(spec, num_classes)
    except Exception as err:  # noqa: BLE001 - the table records every failure
        logging.getLogger(__name__).info("%s cannot be built", spec.key, exc_info=True)
        row.update(failure=f"build: {short_reason(err)}")
    else:
        row.update(input_size=spec.input_size, build_kwargs=spec.build_kwargs)
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randn(2, 3, spec.input_size, spec.input_size, generator=generator)
        result = run_chain(
            model, example_input, num_classes=num_classes, formats=formats, name=spec.name
        )
        row.update(result.to_dict())

    torchscript = row["exports"].get("torchscript", PASS)
    if row["failure"]:
        row["status"] = row["failure"]
    elif torchscript != PASS:
        row["status"] = f"torchscript: {torchscript}"
    else:
        row["status"] = PASS
    row["seconds"] = time.perf_counter() - start
    return row


if __name__ == "__main__":
    sys.exit(main())
