"""Checkpoints: the whole training state as tensors and plain data, written atomically.

A checkpoint is one ``torch.save`` file, ``checkpoint.pt`` in the run directory, read back
with ``weights_only=True``. It holds:

- ``epoch``, ``stage`` and ``history``: finished epochs, the stage and their records;
- ``model``: the state dict of the wrapped module before derivation, of the derived
  module after it;
- ``theta`` and ``decisions``: after derivation, the theta at the moment of derivation
  (the state dict of the mixed edges) and edge id to option. A resumed run rebuilds the
  wrapped module from the original model, loads that theta, derives with those decisions
  and then loads ``model``. No module is ever pickled;
- ``optimizer``, ``arch_optimizer`` (None after derivation) and ``scheduler`` states, and
  ``objective``: the objective's own parameters (a projection head), in order;
- ``rng``: every process's generator states, in rank order (see ``fxadapt.rng``);
- ``loader_generator``: the train loader's shuffling generator at the start of the next,
  or unfinished, epoch. It is None under torchrun, where a DistributedSampler draws the
  order from the seed and the epoch;
- ``unfinished``: None at the end of an epoch. After a stop request (Ctrl-C) inside an
  epoch, every process's running sums of that epoch, in rank order. The resumed run
  continues after the epoch's last trained batch.

A checkpoint is written at the end of every epoch and when training stops on SIGINT or
SIGTERM. A checkpoint whose weights are NaN or infinite is never written, so the file on
disk is always the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import pickle
import signal
import threading
from collections.abc import Iterator

import torch
from torch import nn

from fxadapt.distributed import Parallelism, world_size_from_environment
from fxadapt.errors import FxadaptError, NonFiniteLossError
from fxadapt.passes import MIXED_ROOT
from fxadapt.rng import capture_rng_state, restore_rng_state
from fxadapt.rundir import RunDir
from fxadapt.trainer import EpochRecord, EpochTotals, Trainer, TrainingStopped

__all__ = ["CHECKPOINT_FORMAT", "Checkpointer", "read_checkpoint"]

logger = logging.getLogger(__name__)

# Bump when the content changes so that an older fxadapt's checkpoint is rejected clearly.
CHECKPOINT_FORMAT = 1

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def read_checkpoint(run: RunDir) -> dict:
    """Reads a run's checkpoint with ``weights_only=True``.

    Raises:
        FxadaptError: when the file is missing, unreadable or of another format.
    """
    path = run.file(RunDir.CHECKPOINT)
    try:
        state = run.load_tensors(RunDir.CHECKPOINT)
    except FileNotFoundError as err:
        raise FxadaptError(
            f"run {run.path} has no {RunDir.CHECKPOINT}: it stopped before its first epoch "
            "ended; start it again with --resume auto or --overwrite"
        ) from err
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise FxadaptError(
            f"{path} cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}): "
            "start the run again with --overwrite"
        ) from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise FxadaptError(
            f"{path} has checkpoint format {found}, but this fxadapt reads format "
            f"{CHECKPOINT_FORMAT}: resume with the fxadapt that wrote it, or start the run "
            "again with --overwrite"
        )
    return state


class Checkpointer:
    """Saves and restores a trainer's checkpoints in a run directory.

    Every process of a distributed run calls the same methods, because saving gathers the
    generator states of all processes. Only the process that has ``run`` writes.

    Args:
        run: the run directory, or None on processes other than rank 0.
        parallel: the processes training together.
        train_loader: the train loader, whose shuffling generator the checkpoint keeps.
    """

    def __init__(self, run: RunDir | None, parallel: Parallelism, train_loader):
        self.run = run
        self.parallel = parallel
        self.generator: torch.Generator | None = getattr(train_loader, "generator", None)
        self.epoch_start_generator_state = (
            None if self.generator is None else self.generator.get_state()
        )

    def after_epoch(self, trainer: Trainer, record: EpochRecord) -> None:
        """Saves the checkpoint and the metrics of a finished epoch (the trainer's on_epoch).

        Raises:
            TrainingStopped: when a stop was requested during the epoch; the checkpoint is
                written first.
        """
        if self.generator is not None:
            self.epoch_start_generator_state = self.generator.get_state()
        self.save(trainer)
        if self.run is not None:
            self.run.append_metrics(record.to_dict())
        if self.parallel.any_flags([trainer.stop_requested])[0]:
            raise TrainingStopped(None)

    def save(self, trainer: Trainer, totals: EpochTotals | None = None) -> None:
        """Writes the trainer's state, or raises before writing when its weights went bad.

        Args:
            trainer: the trainer, at the end of an epoch or at a batch boundary.
            totals: the sums of the unfinished epoch when the trainer stopped inside one.

        Raises:
            FxadaptError: when a weight or buffer is NaN or infinite on some process; the
                checkpoint on disk stays the previous one.
        """
        module = trainer.derived if trainer.derived is not None else trainer.wrapped
        bad_name = _first_non_finite(module)
        if self.parallel.any_flags([bad_name is not None])[0]:
            where = f" ({bad_name})" if bad_name else " on another process"
            epoch = totals.epoch + 1 if totals is not None else len(trainer.history)
            raise FxadaptError(
                f"the weights became NaN or infinite{where} in epoch {epoch}: lower --lr or "
                f"--arch-lr and start the run again with --overwrite; "
                f"{self._kept_checkpoint(epoch - 1)}"
            )
        unfinished = None
        if totals is not None:
            unfinished = dataclasses.asdict(totals)
            del unfinished["rng_state"]
        gathered = self.parallel.gather_objects((capture_rng_state(trainer.device), unfinished))
        if self.run is None:
            return
        state = self._state(trainer, module, gathered)
        self.run.save_tensors(RunDir.CHECKPOINT, state)
        logger.debug("saved the checkpoint of epoch %d", len(trainer.history))

    def restore(self, trainer: Trainer, state: dict) -> None:
        """Puts a new trainer, built from the run's model and options, into ``state``.

        Raises:
            FxadaptError: when the checkpoint does not fit the trainer's model, or stopped
                inside an epoch with another number of processes.
        """
        world_size = len(state["rng"])
        if state["unfinished"] is not None and world_size != self.parallel.world_size:
            raise FxadaptError(
                f"the checkpoint stopped inside epoch {state['epoch'] + 1} of a run on "
                f"{world_size} processes: resume it on {world_size} processes"
            )
        try:
            self._load_weights(trainer, state)
        except (RuntimeError, KeyError, ValueError) as err:
            raise FxadaptError(
                f"the checkpoint does not fit the rebuilt model ({str(err).splitlines()[0]}): "
                "the model file or fxadapt changed since the run started; start it again "
                "with --overwrite"
            ) from err
        trainer.history = [EpochRecord(**record) for record in state["history"]]
        self._restore_generators(trainer, state, world_size)
        if state["epoch"] >= trainer.config.epochs:
            logger.info("the run finished all %d epochs; writing its outputs again", state["epoch"])
            return
        logger.info(
            "resuming at epoch %d%s in the %s stage",
            state["epoch"] + 1,
            "" if state["unfinished"] is None else f", step {state['unfinished'][0]['steps'] + 1}",
            trainer.stage,
        )

    @contextlib.contextmanager
    def stop_on_signal(self, trainer: Trainer) -> Iterator[None]:
        """Turns SIGINT and SIGTERM into a checkpoint and a stop at the next batch boundary.

        A second signal stops at once in a single process. Under torchrun it does not,
        because torchrun passes each Ctrl-C on to its workers as another signal. torchrun
        kills the workers that have not stopped 30 s later (PyTorch 2.14).

        Raises:
            KeyboardInterrupt: after the stop, with a message naming the checkpoint.
            FxadaptError: when the loss became NaN or infinite, naming the kept checkpoint.
        """
        previous = self._install_handlers(trainer)
        try:
            yield
        except TrainingStopped as stop:
            self._restore_handlers(previous)
            previous = None
            if stop.totals is not None:
                self.save(trainer, stop.totals)
            raise KeyboardInterrupt(self._stop_message(trainer, stop.totals)) from None
        except NonFiniteLossError as err:
            raise FxadaptError(f"{err}; {self._kept_checkpoint(err.epoch - 1)}") from err
        finally:
            if previous is not None:
                self._restore_handlers(previous)

    def _state(
        self,
        trainer: Trainer,
        module: nn.Module,
        gathered: list[tuple[dict, dict | None]],
    ) -> dict:
        derived = trainer.derived is not None
        rng_states = [rng_state for rng_state, _ in gathered]
        unfinished = [sums for _, sums in gathered]
        return {
            "format": CHECKPOINT_FORMAT,
            "epoch": len(trainer.history),
            "stage": trainer.stage,
            "history": [record.to_dict() for record in trainer.history],
            "model": module.state_dict(),
            "theta": getattr(trainer.wrapped, MIXED_ROOT).state_dict() if derived else None,
            "decisions": (
                {edge.id: edge.decision for edge in trainer.table.edges} if derived else None
            ),
            "optimizer": trainer.optimizer.state_dict(),
            "arch_optimizer": None if derived else trainer.arch_optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "objective": [parameter.detach() for parameter in trainer.objective.parameters()],
            "rng": rng_states,
            "loader_generator": self.epoch_start_generator_state,
            "unfinished": None if unfinished[0] is None else unfinished,
        }

    def _load_weights(self, trainer: Trainer, state: dict) -> None:
        if state["decisions"] is None:
            trainer.wrapped.load_state_dict(state["model"])
            trainer.arch_optimizer.load_state_dict(state["arch_optimizer"])
        else:
            getattr(trainer.wrapped, MIXED_ROOT).load_state_dict(state["theta"])
            trainer.derive(state["decisions"])
            trainer.derived.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        parameters = trainer.objective.parameters()
        if len(parameters) != len(state["objective"]):
            raise ValueError(
                f"the objective has {len(parameters)} parameters, the checkpoint "
                f"{len(state['objective'])}"
            )
        with torch.no_grad():
            for parameter, saved in zip(parameters, state["objective"], strict=True):
                parameter.copy_(saved)

    def _restore_generators(self, trainer: Trainer, state: dict, world_size: int) -> None:
        if world_size != self.parallel.world_size:
            logger.warning(
                "the checkpoint was written by %d processes and this run has %d, so the data "
                "order and augmentation differ from those of an uninterrupted run",
                world_size,
                self.parallel.world_size,
            )
            return
        rng_state = state["rng"][self.parallel.rank]
        if self.generator is not None and state["loader_generator"] is not None:
            self.generator.set_state(state["loader_generator"])
            self.epoch_start_generator_state = state["loader_generator"]
        if state["unfinished"] is None:
            restore_rng_state(rng_state, trainer.device)
        else:
            # The trainer restores the generators after loading the trained batches again.
            sums = state["unfinished"][self.parallel.rank]
            trainer.resume_totals = EpochTotals(**sums, rng_state=rng_state)

    def _install_handlers(self, trainer: Trainer) -> dict | None:
        # Python delivers signals to the main thread only, and only it may set handlers.
        if threading.current_thread() is not threading.main_thread():
            return None
        stop_at_once = world_size_from_environment() <= 1

        def request_stop(signal_number, frame):
            if trainer.stop_requested and stop_at_once:
                raise KeyboardInterrupt(
                    f"stopped at once; the checkpoint of epoch {len(trainer.history)} is kept"
                )
            trainer.stop_requested = True
            logger.warning(
                "%s: saving a checkpoint after the current batch%s",
                signal.Signals(signal_number).name,
                "; send it again to stop at once" if stop_at_once else "",
            )

        previous = {number: signal.getsignal(number) for number in _STOP_SIGNALS}
        for number in _STOP_SIGNALS:
            signal.signal(number, request_stop)
        return previous

    def _restore_handlers(self, previous: dict | None) -> None:
        for number, handler in (previous or {}).items():
            signal.signal(number, handler)

    def _kept_checkpoint(self, epoch: int) -> str:
        if epoch < 1:
            return "no epoch had finished, so there is no checkpoint"
        where = f" in {self.run.path}" if self.run is not None else ""
        return f"the checkpoint of epoch {epoch}{where} is kept"

    def _stop_message(self, trainer: Trainer, totals: EpochTotals | None) -> str:
        if totals is None:
            point = f"after epoch {len(trainer.history)}"
        else:
            point = f"in epoch {totals.epoch + 1} after step {totals.steps}"
        resume = f": continue with `fxadapt train --resume {self.run.path}`" if self.run else ""
        return f"stopped {point}; the checkpoint holds that point{resume}"


def _first_non_finite(module: nn.Module) -> str | None:
    """Returns the name of the first NaN or infinite parameter or buffer, or None."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
