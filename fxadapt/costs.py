"""Costs of a module: parameters, FLOPs from PyTorch's FLOP counter, and measured latency."""

from __future__ import annotations

import logging
import statistics

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "LATENCY_ROUNDS",
    "compare_costs",
    "count_flops",
    "count_parameters",
    "measure_latency",
]

# Rounds of latency timing in ``compare_costs``, each timing every module once.
LATENCY_ROUNDS = 3

logger = logging.getLogger(__name__)


def count_parameters(module: nn.Module) -> int:
    """Returns the number of parameter elements of ``module``, theta included."""
    return sum(parameter.numel() for parameter in module.parameters())


def count_flops(module: nn.Module, example_input: torch.Tensor) -> int:
    """Returns the FLOPs of one forward of ``module`` on ``example_input`` in eval mode."""
    counter = FlopCounterMode(display=False)
    with _eval_mode(module), torch.no_grad(), counter:
        module(example_input)
    return int(counter.get_total_flops())


def measure_latency(
    module: nn.Module, example_input: torch.Tensor, *, min_run_time: float = 0.2
) -> float:
    """Returns the median seconds of one forward in eval mode, from torch's benchmark timer."""
    # Imported here: torch's benchmark package logs a CUDA warning on import on CPU machines.
    from torch.utils import benchmark

    timer = benchmark.Timer(
        stmt="module(example_input)",
        globals={"module": module, "example_input": example_input},
        num_threads=torch.get_num_threads(),
    )
    with _eval_mode(module), torch.no_grad():
        return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def compare_costs(
    name_to_module: dict[str, nn.Module],
    example_input: torch.Tensor,
    *,
    latency: bool = True,
    rounds: int = LATENCY_ROUNDS,
) -> dict[str, dict[str, float]]:
    """Returns module name to its parameters, FLOPs and (optionally) latency in milliseconds.

    FLOPs and latency are per forward of ``example_input``. Latency is the median over
    ``rounds`` rounds that time every module once, in reversed order every other round, so
    that a change in the machine's load touches all modules alike. It remains a time on
    this machine at its current load. Compare modules within one result, not across runs.
    """
    result = {
        name: {
            "parameters": count_parameters(module),
            "flops": count_flops(module, example_input),
        }
        for name, module in name_to_module.items()
    }
    if latency:
        names = list(name_to_module)
        seconds = {name: [] for name in names}
        for round_index in range(rounds):
            for name in names if round_index % 2 == 0 else reversed(names):
                module = name_to_module[name]
                seconds[name].append(measure_latency(module, example_input, min_run_time=0.1))
        for name in names:
            result[name]["latency_ms"] = 1000 * statistics.median(seconds[name])
    for name, costs in result.items():
        logger.debug("costs of %s: %s", name, costs)
    return result


class _eval_mode:
    """Puts a module in eval mode for the duration of a ``with`` block."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc_info):
        self.module.train(self.was_training)
