"""Speed of single forward passes: the wrapped network against the original, and inference
latency, FLOPs and parameters of the derived network against the original.

Every comparison alternates the two modules (A, B, then B, A, and so on) and keeps a ratio
per round, so a change in the machine's load between rounds touches both alike. The
reported ratio is the median of the rounds.
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_setup import Reading, read_clocks
from torch import nn

from fxadapt.costs import count_flops, count_parameters

__all__ = ["compare_forward", "compare_latency", "compare_size"]


def compare_forward(
    original: nn.Module,
    wrapped: nn.Module,
    batch: torch.Tensor,
    *,
    rounds: int,
    clock: str,
    grad: bool = True,
) -> dict:
    """Times one forward pass of each module per round in training mode.

    Args:
        original: the model as the user built it.
        wrapped: the same model from ``fxadapt.wrap``, theta at its initial values.
        batch: the input batch.
        rounds: number of rounds; each times both modules once.
        clock: ``wall`` or ``cpu``, the clock of the ratio.
        grad: whether autograd records the graph, as in a training step, with every
            parameter (theta included) requiring a gradient.

    Returns:
        The median ratio wrapped/original and every round's times in seconds.
    """
    original.train()
    wrapped.train()
    name_to_module = {"original": original, "wrapped": wrapped}
    # One untimed pass each, so that lazy initialisation is not timed.
    for module in name_to_module.values():
        _forward(module, batch, grad)
    times = _alternate(name_to_module, lambda module: _forward(module, batch, grad), rounds)
    return _summary(times, "wrapped", "original", clock)


def compare_latency(
    original: nn.Module,
    derived: nn.Module,
    batch: torch.Tensor,
    *,
    rounds: int,
    min_run_time: float,
    clock: str,
) -> dict:
    """Measures inference latency of both modules per round with torch's benchmark timer.

    Each measurement is the median time of one forward in eval mode without gradients,
    from ``torch.utils.benchmark.Timer.blocked_autorange`` reading ``clock``.

    Returns:
        The median ratio derived/original and every round's latency in seconds.
    """
    name_to_module = {"original": original, "derived": derived}
    latencies = {name: [] for name in name_to_module}
    for round_index in range(rounds):
        names = list(name_to_module)
        if round_index % 2:
            names.reverse()
        for name in names:
            latency = _latency(name_to_module[name], batch, min_run_time, clock)
            latencies[name].append(latency)
    ratios = [
        derived_seconds / original_seconds
        for derived_seconds, original_seconds in zip(
            latencies["derived"], latencies["original"], strict=True
        )
    ]
    return {
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "batch_size": len(batch),
        "seconds": latencies,
    }


def compare_size(original: nn.Module, derived: nn.Module, example: torch.Tensor) -> dict:
    """Returns FLOPs (PyTorch's FLOP counter) and parameters of both modules and the ratios."""
    flops = {"original": count_flops(original, example), "derived": count_flops(derived, example)}
    parameters = {"original": count_parameters(original), "derived": count_parameters(derived)}
    return {
        "flops": flops,
        "flops_ratio": flops["derived"] / flops["original"],
        "parameters": parameters,
        "parameters_ratio": parameters["derived"] / parameters["original"],
        "flops_batch_size": len(example),
    }


def _latency(module: nn.Module, batch: torch.Tensor, min_run_time: float, clock: str) -> float:
    # The default timer is the wall clock, and on CUDA the only one the benchmark timer allows.
    timer_option = {"timer": time.process_time} if clock == "cpu" else {}
    # Imported here: torch's benchmark package logs a CUDA warning on import on CPU machines.
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="module(batch)",
        globals={"module": module, "batch": batch},
        num_threads=torch.get_num_threads(),
        **timer_option,
    )
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return float(timer.blocked_autorange(min_run_time=min_run_time).median)
    finally:
        module.train(was_training)


def _forward(module: nn.Module, batch: torch.Tensor, grad: bool) -> None:
    with torch.set_grad_enabled(grad):
        module(batch)
    if batch.device.type == "cuda":
        torch.cuda.synchronize(batch.device)


def _alternate(name_to_module: dict, work, rounds: int) -> dict[str, list[Reading]]:
    """Runs ``work`` on every module once per round, reversing the order every other round."""
    times = {name: [] for name in name_to_module}
    for round_index in range(rounds):
        names = list(name_to_module)
        if round_index % 2:
            names.reverse()
        for name in names:
            started = read_clocks()
            work(name_to_module[name])
            times[name].append(read_clocks() - started)
    return times


def _summary(times: dict[str, list[Reading]], numerator: str, denominator: str, clock: str):
    ratios = [
        top.get(clock) / bottom.get(clock)
        for top, bottom in zip(times[numerator], times[denominator], strict=True)
    ]
    return {
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "seconds": {
            name: {
                "wall": [reading.wall for reading in readings],
                "cpu": [reading.cpu for reading in readings],
            }
            for name, readings in times.items()
        },
    }
