"""Setup shared by the cost benchmark and the seed study: threads, clocks, data and trainers.

Both scripts compare plain training of a model with an fxadapt run under the same loop. The
plain run is a :class:`fxadapt.trainer.Trainer` with no architecture stage: it derives the
wrapped model at its initial theta (every edge ``same``, theta 1), which gives back the
traced original graph, and trains that. So both runs share the optimizer, schedule, data
order, evaluation and every line of the training loop, and differ only in the architecture
stage and what it derives.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import platform
import time
from dataclasses import dataclass

import torch
from torch import nn

import fxadapt
from fxadapt.accel import AutocastObjective, device_loaders, to_channels_last
from fxadapt.allocator import keep_freed_memory
from fxadapt.data import DATASETS, DataBundle, load_data, make_loaders
from fxadapt.loading import build_model, load_model_class
from fxadapt.objectives import Supervised
from fxadapt.trainer import ARCH_UPDATES, TrainConfig, Trainer, TrainProgress

__all__ = [
    "CLOCKS",
    "Reading",
    "StageClock",
    "ZERO",
    "add_common_arguments",
    "build_trainer",
    "check_common_arguments",
    "environment",
    "example_batch",
    "fraction_of_epochs",
    "set_malloc",
    "load_bundle",
    "new_model",
    "read_clocks",
    "set_threads",
]

logger = logging.getLogger(__name__)

CLOCKS = ("wall", "cpu")


@dataclass(frozen=True)
class Reading:
    """Both clocks at one moment, or the time between two moments, in seconds.

    ``wall`` is ``time.perf_counter``. ``cpu`` is ``time.process_time``: the CPU time of
    every thread of the process, which leaves out the time that other processes on a
    shared machine take from it.
    """

    wall: float
    cpu: float

    def __sub__(self, other: Reading) -> Reading:
        return Reading(self.wall - other.wall, self.cpu - other.cpu)

    def __add__(self, other: Reading) -> Reading:
        return Reading(self.wall + other.wall, self.cpu + other.cpu)

    def get(self, clock: str) -> float:
        """Returns the seconds of ``clock``, ``wall`` or ``cpu``."""
        return getattr(self, clock)


ZERO = Reading(0.0, 0.0)


def read_clocks() -> Reading:
    """Returns the wall clock and the CPU time of this process now."""
    return Reading(time.perf_counter(), time.process_time())


class StageClock(TrainProgress):
    """Times the training loop of each epoch, without the evaluation that follows it.

    The trainer calls ``epoch_started`` before the first batch and ``batch_done`` after every
    batch, so the time from the first call to the last ``batch_done`` is the loop alone.
    On CUDA each reading waits for the GPU first.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.started = ZERO
        self.last_batch = ZERO

    def epoch_started(self, stage: str, epoch: int, epochs: int, batches: int) -> None:
        self.started = self._read()
        self.last_batch = self.started

    def batch_done(self, loss: float, accuracy: float | None, images_per_second: float) -> None:
        self.last_batch = self._read()

    def loop_time(self) -> Reading:
        """Returns the time of the last epoch's training loop."""
        return self.last_batch - self.started

    def _read(self) -> Reading:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return read_clocks()


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the model, data, training and device options that both benchmarks take."""
    parser.add_argument("model", help="model as path/to/file.py:Class or package.module:Class")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", default="cifar10", choices=DATASETS, help="data set (default cifar10)"
    )
    data.add_argument("--data-dir", help="folder of the data set; digits needs none")
    data.add_argument(
        "--train-limit", type=int, help="train images, class-balanced (default: the whole split)"
    )
    data.add_argument("--cache-dir", help="folder for decoded image trees (default ~/.cache)")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=int, default=10, help="epochs of every run (default 10)")
    training.add_argument(
        "--batch-size", type=int, default=128, help="images per batch (default 128)"
    )
    training.add_argument(
        "--arch-update",
        default="alternate",
        choices=ARCH_UPDATES,
        help="theta update of the adapted runs (default alternate)",
    )
    training.add_argument(
        "--arch-every", type=int, default=1, help="theta step on every K-th batch (default 1)"
    )
    training.add_argument(
        "--arch-lr",
        type=float,
        default=TrainConfig.arch_lr,
        help=f"learning rate of theta, Adam (default {TrainConfig.arch_lr})",
    )

    machine = parser.add_argument_group("machine")
    machine.add_argument(
        "--threads",
        type=int,
        help="CPU threads of torch (default: torch's choice, usually one per core)",
    )
    machine.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    machine.add_argument(
        "--device-data",
        action="store_true",
        help="CUDA only: keep the data on the GPU and augment it there",
    )
    machine.add_argument(
        "--channels-last", action="store_true", help="CUDA only: channels-last weights and batches"
    )
    machine.add_argument(
        "--bf16", action="store_true", help="CUDA only: run forward passes under bf16 autocast"
    )
    machine.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make glibc's malloc keep freed memory in the process, as fxadapt train does "
        "(default on; --no-keep-freed-memory measures with glibc's defaults)",
    )


def check_common_arguments(parser: argparse.ArgumentParser, arguments: argparse.Namespace) -> None:
    """Exits through ``parser.error`` when the common options contradict each other."""
    if arguments.data != "digits" and arguments.data_dir is None:
        parser.error(f"--data {arguments.data} needs --data-dir")
    for option in ("epochs", "batch_size", "arch_every"):
        if getattr(arguments, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if not arguments.arch_lr > 0:
        parser.error(f"--arch-lr must be a positive number, got {arguments.arch_lr}")
    if arguments.threads is not None and arguments.threads < 1:
        parser.error("--threads must be at least 1")
    if not arguments.device.startswith("cuda"):
        for option in ("device_data", "channels_last", "bf16"):
            if getattr(arguments, option):
                parser.error(f"--{option.replace('_', '-')} needs --device cuda")
    elif not torch.cuda.is_available():
        parser.error(f"--device {arguments.device}: CUDA is not available here")


def set_malloc(arguments: argparse.Namespace) -> bool:
    """Applies ``--keep-freed-memory`` and returns whether freed memory stays in the process."""
    if not arguments.keep_freed_memory:
        return False
    if keep_freed_memory():
        return True
    logger.warning("glibc not found: --keep-freed-memory has no effect on this C library")
    return False


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads when ``threads`` is given and returns the count in use."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_bundle(arguments: argparse.Namespace, test_limit: int | None) -> DataBundle:
    """Loads the data set of the options; the subset depends on the limits only, not the seed."""
    return load_data(
        arguments.data,
        arguments.data_dir,
        train_limit=arguments.train_limit,
        test_limit=test_limit,
        cache_dir=arguments.cache_dir,
    )


def new_model(spec: str, bundle: DataBundle, seed: int) -> nn.Module:
    """Builds the model of ``spec`` with its weights drawn from ``seed``."""
    kwargs = {}
    if "num_classes" in inspect.signature(load_model_class(spec)).parameters:
        kwargs["num_classes"] = bundle.num_classes
    torch.manual_seed(seed)
    return build_model(spec, kwargs)


def example_batch(bundle: DataBundle) -> torch.Tensor:
    """Returns two unaugmented train images, the example input that ``fxadapt.wrap`` needs."""
    return torch.stack([bundle.train_plain[index][0] for index in range(2)])


def fraction_of_epochs(epochs: int, fraction: float) -> int:
    """Returns ``fraction`` of ``epochs`` rounded half up, at least 1."""
    return max(1, int(epochs * fraction + 0.5))


def build_trainer(
    arguments: argparse.Namespace,
    bundle: DataBundle,
    *,
    arch_epochs: int,
    arch_update: str,
    seed: int,
    test_loader=None,
) -> tuple[Trainer, StageClock]:
    """Builds a trainer for one run; ``arch_epochs=0`` is the plain run of the original.

    Every run with the same ``seed`` starts from the same weights and gets its batches in the
    same order. The plain run is derived at once, so it trains the traced original.

    Args:
        arguments: the parsed common options.
        bundle: the data.
        arch_epochs: epochs of the architecture stage, 0 for the plain run.
        arch_update: ``alternate`` or ``joint``.
        seed: seed of the weights and of the batch order.
        test_loader: loader to evaluate after every epoch, instead of the bundle's test split.

    Returns:
        The trainer and the clock that times its epochs.
    """
    device = torch.device(arguments.device)
    model = new_model(arguments.model, bundle, seed)
    if arguments.channels_last:
        model = to_channels_last(model)
    wrapped = fxadapt.wrap(model, example_batch(bundle).to(memory_format=_memory_format(arguments)))
    if arguments.device_data:
        train_loader, bundle_test = device_loaders(
            bundle, arguments.batch_size, device, seed=seed, channels_last=arguments.channels_last
        )
    else:
        train_loader, bundle_test = make_loaders(
            bundle, arguments.batch_size, seed=seed, pin_memory=device.type == "cuda"
        )
    config = TrainConfig(
        epochs=arguments.epochs,
        arch_epochs=arch_epochs,
        batch_size=arguments.batch_size,
        arch_update=arch_update,
        arch_every=arguments.arch_every,
        arch_lr=arguments.arch_lr,
        seed=seed,
        device=arguments.device,
    )
    objective = AutocastObjective(Supervised(), "bf16", device.type) if arguments.bf16 else None
    clock = StageClock(device)
    trainer = Trainer(
        wrapped,
        train_loader,
        test_loader or bundle_test,
        config,
        objective=objective,
        progress=clock,
    )
    if arch_epochs == 0:
        trainer.derive()
    return trainer, clock


def environment(threads: int, kept_freed_memory: bool) -> dict:
    """Returns what a reader needs to know about the machine that measured."""
    info = {
        "malloc": "glibc, keeping freed memory" if kept_freed_memory else "defaults",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = list(os.getloadavg())
    return info


def _memory_format(arguments: argparse.Namespace) -> torch.memory_format:
    return torch.channels_last if arguments.channels_last else torch.contiguous_format


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
