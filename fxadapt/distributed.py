"""Training on several processes under torchrun, with DistributedDataParallel.

torchrun starts one process per GPU (or several on CPUs) and gives each its place through
the environment: ``WORLD_SIZE`` processes in all, this one's global ``RANK`` and its
``LOCAL_RANK`` on its machine. Without ``WORLD_SIZE`` (or with 1) training runs in one
process and every hook of :class:`Parallelism` does nothing.

How the method maps onto DistributedDataParallel (DDP):

- Weights. DDP averages their gradients during the weight step's backward pass.
- Theta is replicated on every process and left out of DDP. DDP expects a gradient for every
  parameter it manages in every backward pass, but the weight step computes no theta
  gradient, and the theta step uses ``torch.autograd.grad``, which DDP does not support. So
  the theta step runs on the module without its DDP wrapper, and
  :meth:`Parallelism.average_gradients` all-reduces the theta gradients itself. Every process
  then takes the same Adam step from the same theta. ``find_unused_parameters=True`` would not
  help: theta is used in the forward pass, it only gets no gradient.
- Decisions. Just before deriving, theta is broadcast from rank 0, so that every process
  derives from the same values; the decisions are then gathered and compared.
- Derivation builds a new DDP wrapper (DDP hooks the parameters that exist when it is built)
  and a new optimizer around the derived module. Building the wrapper copies rank 0's weights
  and buffers to every process.
- BatchNorm statistics are not synchronised across processes. DDP copies rank 0's buffers to
  the others at every forward pass of the wrapper, as it does by default.
- Data. A ``DistributedSampler`` gives each process its share of the training set, with a new
  order every epoch. ``--batch-size`` is the batch of all processes together, so the same
  options give the same number of steps and images per step as on one process.
- Files and logs come from rank 0 only. The other processes log errors only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from fxadapt.errors import FxadaptError
from fxadapt.passes import MIXED_ROOT

__all__ = [
    "Parallelism",
    "DistributedParallelism",
    "start_process_group",
    "world_size_from_environment",
    "rank_from_environment",
]

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


def world_size_from_environment() -> int:
    """Returns the number of processes torchrun started, or 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_environment() -> int:
    """Returns this process's global rank from torchrun's environment, or 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


class Parallelism:
    """The hooks through which the trainer works with other training processes.

    This base class is one process alone: every hook leaves its argument as it is.
    :class:`DistributedParallelism` implements them for a process group.
    """

    rank = 0
    world_size = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory and logs (rank 0)."""
        return self.rank == 0

    def process_config(self, config):
        """Returns the training settings of this process (its device and seed)."""
        return config

    def shard_loader(self, loader: DataLoader, seed: int) -> DataLoader:
        """Returns a loader that yields this process's share of ``loader``'s data."""
        return loader

    def wrap(self, module: nn.Module) -> nn.Module:
        """Returns the module that the training steps call."""
        return module

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Averages the gradients of parameters that DDP does not manage."""

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """Copies rank 0's values of ``tensors`` into every process's."""

    def sum_values(self, values: list[float]) -> list[float]:
        """Returns the sums of ``values`` over all processes."""
        return list(values)

    def any_flags(self, flags: list[bool]) -> list[bool]:
        """Returns, for each flag, whether it is set on any process."""
        return list(flags)

    def check_same_decisions(self, edge_id_to_decision: dict[int, str]) -> None:
        """Raises RuntimeError when another process derived other decisions."""

    def gather_objects(self, value) -> list | None:
        """Returns every process's ``value`` on rank 0, in rank order, and None elsewhere."""
        return [value]

    def run_on_main(self, function: Callable[[], Result]) -> Result:
        """Calls ``function`` on rank 0 and returns its result, or raises its error, everywhere."""
        return function()

    def close(self) -> None:
        """Ends the process group when this object started it."""


class DistributedParallelism(Parallelism):
    """The trainer's hooks for a process group started by :func:`start_process_group`.

    Args:
        device: the device of this process.
        owns_group: whether :meth:`close` destroys the process group.
    """

    def __init__(self, device: torch.device, *, owns_group: bool):
        self.device = device
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.owns_group = owns_group
        # NCCL exchanges CUDA tensors only; gloo exchanges CPU tensors.
        self.exchange_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def process_config(self, config):
        """Returns ``config`` with this process's device and a seed offset by its rank.

        The offset gives each process its own augmentation; the weights need none because
        DDP copies rank 0's weights when it wraps the module.
        """
        return dataclasses.replace(config, device=str(self.device), seed=config.seed + self.rank)

    def shard_loader(self, loader: DataLoader, seed: int) -> DataLoader:
        """Returns a loader over this process's share, with ``loader``'s batch split evenly.

        Raises:
            FxadaptError: when the batch size is not a multiple of the number of processes.
        """
        batch_size = loader.batch_size
        if batch_size % self.world_size:
            raise FxadaptError(
                f"--batch-size {batch_size} does not split evenly over {self.world_size} "
                f"processes: pass a multiple of {self.world_size}"
            )
        sampler = DistributedSampler(
            loader.dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=True,
            seed=seed,
        )
        return DataLoader(
            loader.dataset,
            batch_size=batch_size // self.world_size,
            sampler=sampler,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            persistent_workers=loader.num_workers > 0,
        )

    def wrap(self, module: nn.Module) -> nn.Module:
        """Returns ``module`` in a new DDP wrapper that leaves theta out."""
        theta_names = _theta_names(module)
        if theta_names:
            # NOTE: this static method is private DDP API, present in torch 2.4 to 2.14. No
            # public API keeps some parameters of a module out of DDP's gradient reduction.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, theta_names)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def average_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        parameters = [parameter for parameter in parameters if parameter.grad is not None]
        if not parameters:
            return
        flat = self._flatten([parameter.grad for parameter in parameters])
        dist.all_reduce(flat)
        flat /= self.world_size
        self._unflatten(flat, [parameter.grad for parameter in parameters])

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        tensors = list(tensors)
        if not tensors:
            return
        flat = self._flatten([tensor.detach() for tensor in tensors])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            self._unflatten(flat, tensors)

    def sum_values(self, values: list[float]) -> list[float]:
        totals = torch.tensor(values, dtype=torch.float64, device=self.exchange_device)
        dist.all_reduce(totals)
        return totals.tolist()

    def any_flags(self, flags: list[bool]) -> list[bool]:
        counts = torch.tensor([int(flag) for flag in flags], device=self.exchange_device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return [bool(count) for count in counts.tolist()]

    def check_same_decisions(self, edge_id_to_decision: dict[int, str]) -> None:
        gathered: list[dict[int, str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, edge_id_to_decision)
        for rank, other in enumerate(gathered):
            differing = sorted(
                edge_id
                for edge_id, decision in edge_id_to_decision.items()
                if other.get(edge_id) != decision
            )
            if differing:
                raise RuntimeError(
                    f"process {rank} derived other decisions than process {self.rank} on edges "
                    f"{differing}, although theta was broadcast from process 0 before deriving"
                )
        logger.info("all %d processes derived the same decisions", self.world_size)

    def gather_objects(self, value) -> list | None:
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def run_on_main(self, function: Callable[[], Result]) -> Result:
        outcome: list = [None]
        failure: BaseException | None = None
        if self.is_main:
            try:
                outcome = [("result", function())]
            except Exception as err:  # noqa: BLE001 - every process must learn of the failure
                failure = err
                outcome = [("error", str(err), isinstance(err, FxadaptError))]
        dist.broadcast_object_list(outcome, src=0)
        if failure is not None:
            raise failure
        if outcome[0][0] == "error":
            _, message, user_error = outcome[0]
            if user_error:
                raise FxadaptError(message)
            raise RuntimeError(f"process 0 failed: {message}")
        return outcome[0][1]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def _flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensor.reshape(-1) for tensor in tensors]).to(self.exchange_device)

    def _unflatten(self, flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
        offset = 0
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset : offset + count].view_as(tensor))
            offset += count


def start_process_group(device_name: str) -> Parallelism:
    """Joins the processes torchrun started, or returns the one-process hooks outside torchrun.

    Under torchrun, ``--device cuda`` gives each process the GPU of its ``LOCAL_RANK`` and the
    NCCL backend; ``--device cpu`` uses gloo. A process group that the caller started
    already is used as it is and left open.

    Raises:
        FxadaptError: when the device does not suit several processes: one named GPU for
            all of them, or more processes on a machine than it has GPUs.
    """
    world_size = world_size_from_environment()
    if world_size <= 1:
        return Parallelism()
    device = _process_device(device_name, world_size)
    owns_group = not dist.is_initialized()
    if owns_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    parallelism = DistributedParallelism(device, owns_group=owns_group)
    logger.info(
        "process %d of %d on %s (%s backend)",
        parallelism.rank,
        parallelism.world_size,
        device,
        dist.get_backend(),
    )
    return parallelism


def _process_device(device_name: str, world_size: int) -> torch.device:
    from fxadapt.trainer import resolve_device

    device = resolve_device(device_name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise FxadaptError(
            f"--device {device_name} names one GPU, but torchrun started {world_size} "
            "processes: pass --device cuda, so that each process takes the GPU of its "
            "LOCAL_RANK"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpu_count = torch.cuda.device_count()
    if local_rank >= gpu_count:
        raise FxadaptError(
            f"this process has LOCAL_RANK {local_rank}, but its machine has {gpu_count} GPUs: "
            f"start at most {gpu_count} processes per machine (--nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def _theta_names(module: nn.Module) -> list[str]:
    mixed_edges = getattr(module, MIXED_ROOT, None)
    if mixed_edges is None:
        return []
    names = [name for name, _ in mixed_edges.named_parameters()]
    names += [name for name, _ in mixed_edges.named_buffers()]
    return [f"{MIXED_ROOT}.{name}" for name in names]
