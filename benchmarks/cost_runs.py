"""Training runs of the cost benchmark, interleaved epoch by epoch, and its memory probes.

Four runs train side by side from the same weights, on the same batches:

- ``plain``: the original network, no architecture stage;
- ``adapt_tenth``: fxadapt with the architecture stage at a tenth of the epochs;
- ``adapt_quarter``: the same at a quarter of the epochs;
- ``joint``: the architecture stage of ``adapt_quarter`` with ``--arch-update joint``. It
  stops at derivation, because its network stage would repeat that of ``adapt_quarter``.

Epoch e of every run is trained before epoch e + 1 of any run, and the run that goes first
changes from epoch to epoch. Before each epoch the global generator is seeded from the
epoch alone, so every run draws the same augmentation.

The memory probe runs in a process of its own per variant, so that one variant's peak does
not hide the other's. It takes a few training steps and reports the peak resident memory
of those steps (CUDA's allocator peak on a GPU).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_setup import ZERO, Reading, build_trainer, fraction_of_epochs, read_clocks

__all__ = [
    "MEMORY_VARIANTS",
    "RunPlan",
    "memory_probe",
    "plan_runs",
    "run_interleaved",
    "run_memory_probes",
]

MEMORY_VARIANTS = ("plain", "alternate", "joint")

# Seed of the global generator before epoch e is this times e plus the run's seed.
_EPOCH_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class RunPlan:
    """One training run of the benchmark.

    Attributes:
        name: ``plain``, ``adapt_tenth``, ``adapt_quarter`` or ``joint``.
        arch_epochs: epochs of the architecture stage, 0 for ``plain``.
        arch_update: ``alternate`` or ``joint``.
        epochs: epochs this run trains.
        derives: whether the run derives after its architecture stage.
    """

    name: str
    arch_epochs: int
    arch_update: str
    epochs: int
    derives: bool = True


def plan_runs(epochs: int, arch_update: str) -> list[RunPlan]:
    """Returns the four runs for ``epochs`` epochs; ``arch_update`` is that of the adapt runs."""
    tenth = fraction_of_epochs(epochs, 0.1)
    quarter = fraction_of_epochs(epochs, 0.25)
    return [
        RunPlan("plain", 0, "alternate", epochs),
        RunPlan("adapt_tenth", tenth, arch_update, epochs),
        RunPlan("adapt_quarter", quarter, arch_update, epochs),
        RunPlan("joint", quarter, "joint", quarter, derives=False),
    ]


def run_interleaved(arguments, bundle, plans: list[RunPlan], repeats: int, progress=print):
    """Trains every run ``repeats`` times, epoch by epoch in turn.

    Args:
        arguments: the parsed options of the benchmark.
        bundle: the data.
        plans: the runs, from :func:`plan_runs`.
        repeats: how many times to train the whole set of runs.
        progress: called with a line of text after every epoch.

    Returns:
        One dict per trained epoch (repeat, run, epoch, stage, loop and total time, derive
        time) and the derived module of the last ``adapt_tenth`` run.
    """
    samples = []
    derived = None
    for repeat in range(repeats):
        name_to_trainer = {
            plan.name: build_trainer(
                arguments,
                bundle,
                arch_epochs=plan.arch_epochs,
                arch_update=plan.arch_update,
                seed=arguments.seed,
            )
            for plan in plans
        }
        for epoch in range(max(plan.epochs for plan in plans)):
            active = [plan for plan in plans if epoch < plan.epochs]
            shift = (epoch + repeat) % len(active)
            for plan in active[shift:] + active[:shift]:
                trainer, clock = name_to_trainer[plan.name]
                torch.manual_seed(arguments.seed + _EPOCH_SEED_STRIDE * epoch)
                sample = _train_epoch(trainer, clock, plan, epoch)
                samples.append({"repeat": repeat, "run": plan.name, **sample})
                progress(
                    f"repeat {repeat + 1}/{repeats} epoch {epoch + 1} {plan.name}: "
                    f"{sample['stage']} loop {sample['loop_seconds']['wall']:.1f} s wall, "
                    f"{sample['loop_seconds']['cpu']:.1f} s CPU"
                )
        derived = name_to_trainer["adapt_tenth"][0].derived
        del name_to_trainer
    return samples, derived


def _train_epoch(trainer, clock, plan: RunPlan, epoch: int) -> dict:
    started = _read(trainer.device)
    record = trainer.run_epoch(epoch)
    trainer.history.append(record)
    derive_time = ZERO
    if plan.derives and trainer.derived is None and epoch + 1 == plan.arch_epochs:
        derive_started = _read(trainer.device)
        trainer.derive()
        derive_time = _read(trainer.device) - derive_started
    total = _read(trainer.device) - started
    return {
        "epoch": epoch + 1,
        "stage": record.stage,
        "loop_seconds": _as_dict(clock.loop_time()),
        "total_seconds": _as_dict(total),
        "derive_seconds": _as_dict(derive_time),
        "test_accuracy": record.test_accuracy,
    }


def run_memory_probes(argv: list[str], repeats: int, progress=print) -> dict[str, list[dict]]:
    """Starts one probe process per variant and repeat, alternating the variants.

    Args:
        argv: the benchmark's own command-line arguments, passed on to every probe.
        repeats: probes per variant.
        progress: called with a line of text after every probe.

    Returns:
        Variant name to the reports of its probes.

    Raises:
        RuntimeError: when a probe fails; the message contains the end of its error output.
    """
    script = Path(__file__).resolve().parent / "cost.py"
    variant_to_reports = {variant: [] for variant in MEMORY_VARIANTS}
    for repeat in range(repeats):
        variants = list(MEMORY_VARIANTS)
        if repeat % 2:
            variants.reverse()
        for variant in variants:
            command = [sys.executable, str(script), *argv, "--memory-probe", variant]
            finished = subprocess.run(command, capture_output=True, text=True, check=False)
            if finished.returncode != 0:
                raise RuntimeError(
                    f"the memory probe of {variant} failed with exit status "
                    f"{finished.returncode}: {finished.stderr[-2000:]}"
                )
            report = json.loads(finished.stdout.strip().splitlines()[-1])
            variant_to_reports[variant].append(report)
            progress(f"memory probe {variant}: peak {report['peak_bytes'] / 2**20:.0f} MiB")
    return variant_to_reports


def memory_probe(arguments, bundle, variant: str, steps: int) -> dict:
    """Takes ``steps`` training steps of one variant and returns its memory peak.

    ``plain`` takes weight steps of the original network; ``alternate`` and ``joint`` take
    steps of the architecture stage with that theta update.

    Returns:
        ``peak_bytes`` (the peak during the steps), ``baseline_bytes`` (resident memory just
        before them), ``peak_source`` and the device.
    """
    update = "joint" if variant == "joint" else "alternate"
    arch_epochs = 0 if variant == "plain" else 1
    trainer, _ = build_trainer(
        arguments, bundle, arch_epochs=arch_epochs, arch_update=update, seed=arguments.seed
    )
    trainer.model.train()
    batches = iter(trainer.train_loader)
    # Loading the batches first keeps the data loader's memory out of the steps' peak.
    chosen = [next(batches) for _ in range(min(steps, len(trainer.train_loader)))]
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _resident_bytes("VmRSS")
        peak_reset = _reset_peak_resident()
    for batch in chosen:
        trainer.train_step(batch, update_theta=variant != "plain")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak, source = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    elif peak_reset:
        peak, source = _resident_bytes("VmHWM"), "VmHWM after clear_refs"
    else:
        # Without a reset the high-water mark also covers the setup before the steps.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        source = "ru_maxrss since start"
    return {
        "variant": variant,
        "steps": len(chosen),
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "peak_source": source,
        "device": str(device),
    }


def _resident_bytes(field: str) -> int:
    """Returns a memory field of /proc/self/status (VmRSS, VmHWM) in bytes, or 0 without it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_resident() -> bool:
    """Resets the kernel's peak resident memory (VmHWM) of this process, where Linux allows."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _resident_bytes("VmHWM") > 0


def _read(device: torch.device) -> Reading:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return read_clocks()


def _as_dict(reading: Reading) -> dict[str, float]:
    return {"wall": reading.wall, "cpu": reading.cpu}
