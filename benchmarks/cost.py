"""Cost benchmark: what adapting a network with fxadapt costs against plain training.

    python benchmarks/cost.py models/resnet20.py:ResNet20 --data-dir DIR \\
        --train-limit 5000 --epochs 10 --out cost.json

Measures, each as a ratio fxadapt / plain (or derived / original), median of rounds that
alternate the two sides in this one process:

- ``forward_ratio``: one training-mode forward pass of the wrapped network at its initial
  theta (every edge mixed), fused as the trainer runs it, against the original network;
- ``arch_epoch_ratio``: an epoch of the architecture stage (alternating weight and theta
  steps) against a plain epoch; ``arch_epoch_ratio_joint`` the same with
  ``--arch-update joint``;
- ``network_epoch_ratio``: an epoch of the derived network against a plain epoch;
- ``total_ratio_tenth`` and ``total_ratio_quarter``: a whole run, evaluation and derivation
  included, with the architecture stage at a tenth and a quarter of the epochs;
- ``peak_memory_ratio``: peak memory of architecture-stage steps against plain steps, from
  one process per variant (peak resident memory on CPU, the CUDA allocator's peak on GPU);
- ``latency_ratio_b1`` and ``latency_ratio_b128``: inference latency of the derived network
  (from the tenth run) against the original, at batch 1 and 128; the same ratios with both
  networks traced to TorchScript under ``latency_ratio_b1_torchscript`` and
  ``latency_ratio_b128_torchscript``;
- ``flops_ratio``: FLOPs of the derived network against the original.

Epoch and run times come from the clock chosen with ``--clock``. The JSON records both the
wall time and the process CPU time of every measurement. Writes the JSON to ``--out`` and a
Markdown table beside it, and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from bench_setup import (
    CLOCKS,
    add_common_arguments,
    check_common_arguments,
    environment,
    load_bundle,
    new_model,
    set_malloc,
    set_threads,
)
from cost_runs import MEMORY_VARIANTS, memory_probe, plan_runs, run_interleaved, run_memory_probes
from cost_speed import compare_forward, compare_latency, compare_size

import fxadapt

logger = logging.getLogger("cost")

# Ratio name to the largest value that counts as cheap enough; None means reported only.
TARGETS = {
    "forward_ratio": 1.05,
    "arch_epoch_ratio": 1.75,
    "arch_epoch_ratio_joint": 1.10,
    "network_epoch_ratio": 1.00,
    "total_ratio_tenth": 1.08,
    "total_ratio_quarter": None,
    "peak_memory_ratio": 1.15,
    "latency_ratio_b1": 1.00,
    "latency_ratio_b128": 1.00,
    "latency_ratio_b1_torchscript": None,
    "latency_ratio_b128_torchscript": None,
    "flops_ratio": 1.00,
}

DESCRIPTIONS = {
    "forward_ratio": "training-mode forward, wrapped at initial theta / original",
    "arch_epoch_ratio": "architecture-stage epoch (alternate) / plain epoch",
    "arch_epoch_ratio_joint": "architecture-stage epoch (joint) / plain epoch",
    "network_epoch_ratio": "network-stage epoch of the derived network / plain epoch",
    "total_ratio_tenth": "whole run, architecture stage at a tenth of the epochs / plain run",
    "total_ratio_quarter": "whole run, architecture stage at a quarter of the epochs / plain run",
    "peak_memory_ratio": "peak memory of architecture-stage steps / plain steps",
    "latency_ratio_b1": "inference latency at batch 1, derived / original",
    "latency_ratio_b128": "inference latency at batch 128, derived / original",
    "latency_ratio_b1_torchscript": "the same at batch 1, both traced to TorchScript",
    "latency_ratio_b128_torchscript": "the same at batch 128, both traced to TorchScript",
    "flops_ratio": "FLOPs, derived / original",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser()
    arguments = parser.parse_args(argv)
    check_common_arguments(parser, arguments)
    _check_arguments(parser, arguments)
    kept_freed_memory = set_malloc(arguments)
    threads = set_threads(arguments.threads)
    bundle = load_bundle(arguments, test_limit=arguments.test_limit)
    if arguments.memory_probe:
        report = memory_probe(arguments, bundle, arguments.memory_probe, arguments.memory_steps)
        print(json.dumps(report))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    results = {"config": vars(arguments), "environment": environment(threads, kept_freed_memory)}
    results["forward"] = _measure_forward(arguments, bundle)
    results["memory"] = _measure_memory(argv, arguments)
    plans = plan_runs(arguments.epochs, arguments.arch_update)
    results["runs"] = {plan.name: vars(plan) for plan in plans}
    samples, derived = run_interleaved(
        arguments, bundle, plans, arguments.repeats, progress=logger.info
    )
    results["epochs"] = samples
    results["derived"] = _measure_derived(arguments, bundle, derived)
    ratios = compute_ratios(results, arguments.clock)
    output = {**ratios, "targets": TARGETS, **results}
    if hasattr(os, "getloadavg"):
        output["environment"]["load_average_at_end"] = list(os.getloadavg())

    out = Path(arguments.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2, default=str), encoding="utf-8")
    table = markdown_table(ratios, results, arguments)
    markdown_path = Path(arguments.markdown) if arguments.markdown else out.with_suffix(".md")
    markdown_path.write_text(table, encoding="utf-8")
    print(table)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure what adapting a network costs against plain training.",
    )
    add_common_arguments(parser)

    measure = parser.add_argument_group("measurement")
    measure.add_argument(
        "--test-limit",
        type=int,
        default=1000,
        help="test images evaluated per epoch (default 1000)",
    )
    measure.add_argument("--seed", type=int, default=0, help="seed of weights and batch order")
    measure.add_argument(
        "--repeats", type=int, default=1, help="times every training run is repeated (default 1)"
    )
    measure.add_argument(
        "--forward-rounds",
        type=int,
        default=20,
        help="rounds of the forward comparison (default 20)",
    )
    measure.add_argument(
        "--latency-rounds",
        type=int,
        default=7,
        help="rounds of each latency comparison (default 7)",
    )
    measure.add_argument(
        "--latency-min-time",
        type=float,
        default=0.5,
        help="seconds of timing per latency measurement (default 0.5)",
    )
    measure.add_argument(
        "--memory-steps", type=int, default=5, help="training steps per memory probe (default 5)"
    )
    measure.add_argument(
        "--memory-repeats", type=int, default=2, help="memory probes per variant (default 2)"
    )
    measure.add_argument(
        "--clock",
        default="wall",
        choices=CLOCKS,
        help="clock of the time ratios: wall time or process CPU time (default wall)",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, help="JSON file of the results")
    output.add_argument("--markdown", help="Markdown table (default: --out with .md)")

    # Internal: run one memory probe and print its report as JSON.
    parser.add_argument("--memory-probe", choices=MEMORY_VARIANTS, help=argparse.SUPPRESS)

    return parser


def _check_arguments(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    for option in (
        "test_limit",
        "repeats",
        "forward_rounds",
        "latency_rounds",
        "memory_steps",
        "memory_repeats",
    ):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if arguments.latency_min_time <= 0:
        parser.error("--latency-min-time must be positive")
    if arguments.clock == "cpu" and arguments.device.startswith("cuda"):
        parser.error("--clock cpu does not count GPU work: use --clock wall with --device cuda")


def _measure_forward(arguments, bundle) -> dict:
    """Times forward passes of the wrapped network at its initial theta against the original.

    The trainer runs the fused module (``fxadapt.fuse``), so the ratios are those of the
    fused module. Three ways: every parameter requiring a gradient (the joint update), theta
    frozen (the trainer's weight step), and without gradients. The wrapped module as
    ``fxadapt.wrap`` returns it, with one pass per option, is timed too, under
    ``unfused``.
    """
    device = torch.device(arguments.device)
    batch = _batch(bundle.train_plain, arguments.batch_size, device, arguments.channels_last)
    original = _prepare(new_model(arguments.model, bundle, arguments.seed), arguments)
    wrapped = fxadapt.wrap(original, batch[:2]).to(device)
    fused = fxadapt.fuse(wrapped)
    logger.info("timing %d forward passes of each network", 8 * arguments.forward_rounds)
    compare = functools.partial(
        compare_forward, batch=batch, rounds=arguments.forward_rounds, clock=arguments.clock
    )
    result = {
        "batch_size": len(batch),
        "training_mode": compare(original, fused),
        "unfused": {"training_mode": compare(original, wrapped)},
    }
    thetas = fxadapt.arch_parameters(wrapped)
    for theta in thetas:
        theta.requires_grad_(False)
    result["theta_frozen"] = compare(original, fused)
    result["without_gradients"] = compare(original, fused, grad=False)
    result["unfused"]["theta_frozen"] = compare(original, wrapped)
    return result


def _measure_memory(argv: list[str], arguments) -> dict:
    logger.info("probing memory, %d processes per variant", arguments.memory_repeats)
    reports = run_memory_probes(argv, arguments.memory_repeats, progress=logger.info)
    peaks = {variant: [report["peak_bytes"] for report in reports[variant]] for variant in reports}
    increases = {
        variant: [report["peak_bytes"] - report["baseline_bytes"] for report in reports[variant]]
        for variant in reports
    }
    return {
        "reports": reports,
        "peak_ratio": statistics.median(peaks["alternate"]) / statistics.median(peaks["plain"]),
        "peak_ratio_joint": statistics.median(peaks["joint"]) / statistics.median(peaks["plain"]),
        "increase_ratio": _safe_ratio(
            statistics.median(increases["alternate"]), statistics.median(increases["plain"])
        ),
    }


def _measure_derived(arguments, bundle, derived) -> dict:
    device = torch.device(arguments.device)
    original = _prepare(new_model(arguments.model, bundle, arguments.seed), arguments).eval()
    derived = derived.eval()
    table = fxadapt.edge_table(derived)
    result = {
        "decisions": {str(edge.id): edge.decision for edge in table.edges},
        "size": compare_size(original, derived, _batch(bundle.test, 1, device, False)),
    }
    for batch_size in (1, 128):
        batch = _batch(bundle.test, batch_size, device, arguments.channels_last)
        logger.info("timing inference latency at batch %d", len(batch))
        compare = functools.partial(
            compare_latency,
            batch=batch,
            rounds=arguments.latency_rounds,
            min_run_time=arguments.latency_min_time,
            clock=arguments.clock,
        )
        result[f"latency_b{batch_size}"] = compare(original, derived)
        # As deployed: both traced to TorchScript, which runs without the Python overhead of
        # either module's forward (nn.Module calls on one side, a GraphModule on the other).
        with torch.no_grad():
            original_script = torch.jit.trace(original, batch)
            derived_script = torch.jit.trace(derived, batch)
        result[f"latency_torchscript_b{batch_size}"] = compare(original_script, derived_script)
    return result


def compute_ratios(results: dict, clock: str) -> dict[str, float]:
    """Returns the top-level ratios from the measurements in ``results``."""
    samples = results["epochs"]
    derived = results["derived"]
    return {
        "forward_ratio": results["forward"]["training_mode"]["ratio"],
        "arch_epoch_ratio": _epoch_ratio(
            samples, ("adapt_tenth", "adapt_quarter"), "architecture", clock
        ),
        "arch_epoch_ratio_joint": _epoch_ratio(samples, ("joint",), "architecture", clock),
        "network_epoch_ratio": _epoch_ratio(
            samples, ("adapt_tenth", "adapt_quarter"), "network", clock
        ),
        "total_ratio_tenth": _total_ratio(samples, "adapt_tenth", clock),
        "total_ratio_quarter": _total_ratio(samples, "adapt_quarter", clock),
        "peak_memory_ratio": results["memory"]["peak_ratio"],
        "latency_ratio_b1": derived["latency_b1"]["ratio"],
        "latency_ratio_b128": derived["latency_b128"]["ratio"],
        "latency_ratio_b1_torchscript": derived["latency_torchscript_b1"]["ratio"],
        "latency_ratio_b128_torchscript": derived["latency_torchscript_b128"]["ratio"],
        "flops_ratio": derived["size"]["flops_ratio"],
    }


def _epoch_ratio(samples: list[dict], runs: tuple[str, ...], stage: str, clock: str) -> float:
    """Returns the median over epochs of a run's loop time over the plain run's, same epoch."""
    plain = {
        (sample["repeat"], sample["epoch"]): sample["loop_seconds"][clock]
        for sample in samples
        if sample["run"] == "plain"
    }
    ratios = [
        sample["loop_seconds"][clock] / plain[(sample["repeat"], sample["epoch"])]
        for sample in samples
        if sample["run"] in runs and sample["stage"] == stage
    ]
    return statistics.median(ratios) if ratios else float("nan")


def _total_ratio(samples: list[dict], run: str, clock: str) -> float:
    """Returns the median over repeats of a run's total time over the plain run's."""
    repeats = sorted({sample["repeat"] for sample in samples})
    ratios = []
    for repeat in repeats:
        totals = {}
        for name in (run, "plain"):
            totals[name] = sum(
                sample["total_seconds"][clock]
                for sample in samples
                if sample["repeat"] == repeat and sample["run"] == name
            )
        ratios.append(totals[run] / totals["plain"])
    return statistics.median(ratios)


def markdown_table(ratios: dict[str, float], results: dict, arguments) -> str:
    """Returns a Markdown table of the ratios, their targets and how they were measured."""
    lines = [
        f"Model {arguments.model}, {arguments.data}, {arguments.train_limit or 'all'} train "
        f"images, {arguments.epochs} epochs, batch {arguments.batch_size}, "
        f"{results['environment']['torch_threads']} torch threads, {arguments.device}, "
        f"clock {arguments.clock}, {arguments.repeats} repeat(s), malloc "
        f"{results['environment']['malloc']}.",
        "",
        "| Ratio | Measured | Target | Within target | What it compares |",
        "|---|---|---|---|---|",
    ]
    for name, value in ratios.items():
        target = TARGETS[name]
        target_cell, within = "–", "–"
        if target is not None:
            target_cell = f"≤ {target:.2f}"
            within = "yes" if value <= target else "no"
        lines.append(
            f"| `{name}` | {value:.3f} | {target_cell} | {within} | {DESCRIPTIONS[name]} |"
        )
    return "\n".join(lines) + "\n"


def _batch(dataset, size: int, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = torch.stack([dataset[index][0] for index in range(min(size, len(dataset)))])
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images.to(device)


def _prepare(model: torch.nn.Module, arguments) -> torch.nn.Module:
    if arguments.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(torch.device(arguments.device))


def _safe_ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom > 0 else float("nan")


if __name__ == "__main__":
    sys.exit(main())
