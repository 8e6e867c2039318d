"""Seed study: test accuracy of the original and the adapted network over several seeds.

    python benchmarks/seeds.py models/resnet20.py:ResNet20 --data-dir DIR \\
        --train-limit 5000 --epochs 10 --seeds 3 --out seeds.json

For every seed the original model and an fxadapt run train on the same data subset, from the
same initial weights, in the same batch order. The seed sets the weights, the order and the
augmentation. Runs alternate (original, adapted, then adapted, original for the next
seed), so a change in the machine's load touches both variants alike. After every epoch a
class-balanced subset of the test split (``--monitor-limit``) is evaluated. The accuracy in
the table is that of the last epoch on the whole test split.

Writes the results as JSON (rewritten after every run, so an interrupted study keeps what it
measured), a Markdown table with the accuracy of every seed, the mean, the sample standard
deviation and the training time, and a plot of the accuracies (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from bench_setup import (
    CLOCKS,
    ZERO,
    add_common_arguments,
    build_trainer,
    check_common_arguments,
    environment,
    example_batch,
    fraction_of_epochs,
    load_bundle,
    read_clocks,
    set_malloc,
    set_threads,
)

from fxadapt.costs import count_flops, count_parameters
from fxadapt.data import make_loaders

logger = logging.getLogger("seeds")

VARIANTS = ("original", "adapted")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = Path(arguments.out)
    if arguments.from_json:
        results = json.loads(Path(arguments.from_json).read_text(encoding="utf-8"))
        results["summary"] = summarise(results["runs"], arguments.clock)
    else:
        results = _run_study(parser, arguments, out)

    table = markdown_table(results, arguments.clock, _model_name(arguments.model))
    markdown_path = Path(arguments.markdown) if arguments.markdown else out.with_suffix(".md")
    markdown_path.write_text(table, encoding="utf-8")
    print(table)
    if arguments.plot:
        plot_accuracies(results, Path(arguments.plot), _model_name(arguments.model))
    return 0


def _run_study(parser: argparse.ArgumentParser, arguments: argparse.Namespace, out: Path) -> dict:
    """Trains every seed and variant, rewriting ``out`` after every run, and returns the results."""
    check_common_arguments(parser, arguments)
    if arguments.seeds < 1:
        parser.error("--seeds must be at least 1")
    arch_epochs = arguments.arch_epochs
    if arch_epochs is None:
        arch_epochs = fraction_of_epochs(arguments.epochs, 0.5)
    if not 1 <= arch_epochs <= arguments.epochs:
        parser.error(f"--arch-epochs must be between 1 and --epochs {arguments.epochs}")
    kept_freed_memory = set_malloc(arguments)
    threads = set_threads(arguments.threads)

    bundle = load_bundle(arguments, test_limit=None)
    monitor = load_bundle(arguments, test_limit=arguments.monitor_limit)
    _, monitor_loader = make_loaders(monitor, arguments.batch_size)
    _, full_test_loader = make_loaders(bundle, arguments.batch_size)

    results = {
        "config": {**vars(arguments), "arch_epochs": arch_epochs},
        "environment": environment(threads, kept_freed_memory),
        "runs": [],
    }
    for seed in range(arguments.first_seed, arguments.first_seed + arguments.seeds):
        order = VARIANTS if seed % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            variant_arch_epochs = arch_epochs if variant == "adapted" else 0
            logger.info("seed %d: training the %s network", seed, variant)
            run = _train(
                arguments, bundle, variant_arch_epochs, seed, monitor_loader, full_test_loader
            )
            results["runs"].append({"seed": seed, "variant": variant, **run})
            results["summary"] = summarise(results["runs"], arguments.clock)
            _write_json(out, results)
            logger.info(
                "seed %d %s: test accuracy %.4f, training %.0f s",
                seed,
                variant,
                run["test_accuracy"],
                run["train_seconds"]["wall"],
            )
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the original and the adapted network over several seeds.",
    )
    add_common_arguments(parser)

    study = parser.add_argument_group("study")
    study.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    study.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    study.add_argument(
        "--arch-epochs",
        type=int,
        help="architecture epochs of the adapted runs (default: half of --epochs)",
    )
    study.add_argument(
        "--monitor-limit",
        type=int,
        default=1000,
        help="test images evaluated after every epoch (default 1000)",
    )
    study.add_argument(
        "--clock",
        default="wall",
        choices=CLOCKS,
        help="clock of the cost column: wall time or process CPU time (default wall)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="JSON file of the results")
    output.add_argument("--markdown", help="Markdown table (default: --out with .md)")
    output.add_argument("--plot", help="PNG plot of the accuracies (needs matplotlib)")
    output.add_argument(
        "--from-json",
        help="write the table and plot from this earlier results file instead of training",
    )

    return parser


def _train(arguments, bundle, arch_epochs: int, seed: int, monitor_loader, full_test_loader):
    trainer, clock = build_trainer(
        arguments,
        bundle,
        arch_epochs=arch_epochs,
        arch_update=arguments.arch_update,
        seed=seed,
        test_loader=monitor_loader,
    )
    loop_times = []
    trainer.on_epoch = lambda _trainer, _record: loop_times.append(clock.loop_time())
    started = read_clocks()
    result = trainer.fit()
    total = read_clocks() - started

    trainer.test_loader = full_test_loader
    metrics = trainer.evaluate()
    train_seconds = sum(loop_times, ZERO)
    example = example_batch(bundle)[:1].to(trainer.device)
    decisions = [edge.decision for edge in result.table.edges]
    return {
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "monitor_accuracy": [record.test_accuracy for record in result.history],
        "train_seconds": {"wall": train_seconds.wall, "cpu": train_seconds.cpu},
        "total_seconds": {"wall": total.wall, "cpu": total.cpu},
        "parameters": count_parameters(result.derived),
        "flops": count_flops(result.derived, example),
        "decisions": {option: decisions.count(option) for option in ("same", "identity", "none")},
        "theta": result.history[arch_epochs - 1].theta if arch_epochs else {},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def summarise(runs: list[dict], clock: str) -> dict:
    """Returns per variant the mean and sample standard deviation of accuracy and time."""
    summary = {}
    for variant in VARIANTS:
        chosen = [run for run in runs if run["variant"] == variant]
        if not chosen:
            continue
        accuracies = [run["test_accuracy"] for run in chosen]
        seconds = [run["train_seconds"][clock] for run in chosen]
        summary[variant] = {
            "seeds": [run["seed"] for run in chosen],
            "accuracy_mean": statistics.mean(accuracies),
            "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "train_seconds_mean": statistics.mean(seconds),
        }
    ratios = _cost_ratios(runs, clock)
    if ratios:
        summary["cost_ratio_median"] = statistics.median(ratios)
        summary["cost_ratios"] = ratios
    return summary


def _cost_ratios(runs: list[dict], clock: str) -> list[float]:
    """Returns adapted/original training time of every seed that has both runs."""
    seed_to_seconds: dict[int, dict[str, float]] = {}
    for run in runs:
        seed_to_seconds.setdefault(run["seed"], {})[run["variant"]] = run["train_seconds"][clock]
    return [
        seconds["adapted"] / seconds["original"]
        for seconds in seed_to_seconds.values()
        if len(seconds) == 2
    ]


def markdown_table(results: dict, clock: str, model_name: str) -> str:
    """Returns the Markdown table of accuracies (in percent) per seed, with mean and std."""
    runs = results["runs"]
    seeds = sorted({run["seed"] for run in runs})
    summary = results["summary"]
    header = ["Network", *[f"seed {seed}" for seed in seeds], "mean", "std", "training time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in VARIANTS:
        if variant not in summary:
            continue
        seed_to_accuracy = {
            run["seed"]: run["test_accuracy"] for run in runs if run["variant"] == variant
        }
        cells = [f"{model_name} ({variant})"]
        cells += [_percent(seed_to_accuracy.get(seed)) for seed in seeds]
        cells += [
            _percent(summary[variant]["accuracy_mean"]),
            _percent(summary[variant]["accuracy_std"]),
            _cost_cell(summary, variant, clock),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cost_cell(summary: dict, variant: str, clock: str) -> str:
    seconds = summary[variant]["train_seconds_mean"]
    if variant == "original" or "cost_ratio_median" not in summary:
        return f"{seconds:.0f} s ({clock})"
    return f"{seconds:.0f} s ({clock}), {summary['cost_ratio_median']:.2f}×"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def plot_accuracies(results: dict, path: Path, model_name: str) -> None:
    """Draws every seed's accuracy per variant, with the mean and one standard deviation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is missing, so %s is not drawn: pip install matplotlib", path)
        return
    figure, axes = plt.subplots(figsize=(4.5, 3.5))
    for position, variant in enumerate(VARIANTS):
        accuracies = [
            100 * run["test_accuracy"] for run in results["runs"] if run["variant"] == variant
        ]
        if not accuracies:
            continue
        first = position == 0
        axes.scatter(
            [position] * len(accuracies),
            accuracies,
            color="tab:blue",
            zorder=3,
            label="one seed" if first else None,
        )
        mean = statistics.mean(accuracies)
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        axes.errorbar(
            position + 0.15,
            mean,
            yerr=std,
            fmt="s",
            color="black",
            capsize=4,
            label="mean ± std" if first else None,
        )
    axes.set_xticks(range(len(VARIANTS)), VARIANTS)
    axes.set_xlim(-0.5, len(VARIANTS) - 0.5)
    axes.set_ylabel("test accuracy (%)")
    config = results["config"]
    axes.set_title(
        f"{model_name}, {config['train_limit'] or 'all'} images, {config['epochs']} epochs",
        fontsize=10,
    )
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _model_name(spec: str) -> str:
    return spec.rpartition(":")[2]


def _write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    temporary.replace(path)


if __name__ == "__main__":
    sys.exit(main())
