"""Parameters, FLOPs and latency of the modules that a run's report compares."""

import torch
from torch import nn

import fxadapt.costs
from fxadapt.costs import compare_costs


def test_costs_count_parameters_and_flops():
    module = nn.Linear(4, 3)

    costs = compare_costs({"linear": module}, torch.randn(2, 4), latency=False)

    assert costs == {"linear": {"parameters": 15, "flops": 2 * 2 * 4 * 3}}


def test_latency_rounds_alternate_and_take_median(monkeypatch):
    modules = {"a": nn.Identity(), "b": nn.Identity(), "c": nn.Identity()}
    module_to_name = {id(module): name for name, module in modules.items()}
    calls = []
    # Each module's readings, in the order its rounds take them.
    readings = {"a": [0.003, 0.001, 0.002], "b": [0.010, 0.030, 0.020], "c": [0.5, 0.4, 0.9]}

    def fake_latency(module, example_input, min_run_time):
        name = module_to_name[id(module)]
        calls.append(name)
        return readings[name][calls.count(name) - 1]

    monkeypatch.setattr(fxadapt.costs, "measure_latency", fake_latency)

    costs = compare_costs(modules, torch.randn(1, 2), rounds=3)

    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert costs["a"]["latency_ms"] == 2.0
    assert costs["b"]["latency_ms"] == 20.0
    assert costs["c"]["latency_ms"] == 500.0
