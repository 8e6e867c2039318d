"""Training: the architecture stage with alternating weight and theta steps, then the network stage.

Architecture stage, for every mini-batch: one step of the weights on the batch, then one
step of theta on the same batch with the updated weights. All training data trains the
weights; there is no held-out split. After the architecture epochs the network is derived,
and the network stage trains the derived module's weights only. The weight optimizer keeps
the state of the weights that survive, and the learning-rate schedule runs over the total
epoch count.

Choices that are fxadapt's, not the method's (each is an option): SGD with momentum 0.9,
weight decay 3e-4 and a cosine schedule for the weights (learning rate 0.025, as in the
method's experiments); Adam with learning rate 1e-3, betas (0.5, 0.999) and no weight decay
for theta (weight decay would pull every theta towards 0 and so towards none); gradient
clipping at norm 5 for the weights.

Two faster variants depart from the method and are never the default: ``arch_update="joint"``
takes the gradients of the weights and of theta from one forward and backward pass, and
``arch_every=K`` takes a theta step on every K-th batch only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx
from torch import nn
from torch.utils.data import DataLoader

from fxadapt.api import arch_parameters, derive, edge_table, weight_parameters
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.objectives import Objective, Supervised

__all__ = [
    "ARCH_UPDATES",
    "TrainConfig",
    "EpochRecord",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "resolve_device",
]

logger = logging.getLogger(__name__)

ARCH_UPDATES = ("alternate", "joint")


@dataclass
class TrainConfig:
    """Settings of a training run.

    Attributes:
        epochs: total epochs, architecture stage included.
        arch_epochs: epochs of the architecture stage, at most ``epochs``.
        batch_size: images per mini-batch.
        lr: initial learning rate of the weights.
        momentum: SGD momentum of the weights.
        weight_decay: weight decay of the weights.
        arch_lr: learning rate of theta.
        arch_betas: Adam betas of theta.
        arch_weight_decay: weight decay of theta.
        arch_update: ``alternate`` (the method: a weight step, then a theta step on the same
            batch) or ``joint`` (both from one backward pass; faster, a deviation).
        arch_every: take a theta step on every K-th batch of the architecture stage.
        grad_clip: maximum gradient norm of the weights, or None for no clipping.
        seed: seed of every random number generator the run uses.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
    """

    epochs: int = 10
    arch_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    arch_lr: float = 1e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 0.0
    arch_update: str = "alternate"
    arch_every: int = 1
    grad_clip: float | None = 5.0
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        """Raises FxadaptError when the settings contradict each other."""
        if self.epochs < 1:
            raise FxadaptError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.arch_epochs <= self.epochs:
            raise FxadaptError(
                f"--arch-epochs {self.arch_epochs} must be between 0 and --epochs {self.epochs}"
            )
        if self.batch_size < 1:
            raise FxadaptError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.arch_update not in ARCH_UPDATES:
            raise FxadaptError(
                f"invalid --arch-update {self.arch_update!r}: use one of {', '.join(ARCH_UPDATES)}"
            )
        if self.arch_every < 1:
            raise FxadaptError(f"--arch-every must be at least 1, got {self.arch_every}")


@dataclass
class EpochRecord:
    """What one epoch measured; one line of ``metrics.jsonl``."""

    epoch: int
    stage: str
    train_loss: float
    train_accuracy: float | None
    test_loss: float | None
    test_accuracy: float | None
    lr: float
    arch_lr: float | None
    images_per_second: float
    seconds: float
    theta: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Returns the record as plain data."""
        return asdict(self)


@dataclass
class TrainResult:
    """The outcome of ``Trainer.fit``."""

    derived: torch.fx.GraphModule
    table: EdgeTable
    history: list[EpochRecord]


class TrainProgress:
    """Receives training events; the CLI shows them, the library ignores them."""

    def epoch_started(self, stage: str, epoch: int, epochs: int, batches: int) -> None:
        """Called before the first batch of an epoch."""

    def batch_done(self, loss: float, accuracy: float | None, images_per_second: float) -> None:
        """Called after every batch with running averages over the epoch."""

    def epoch_done(self, record: EpochRecord) -> None:
        """Called after the epoch's evaluation."""

    def derived(self, table: EdgeTable) -> None:
        """Called once the decisions are made."""


def resolve_device(name: str) -> torch.device:
    """Returns the torch device for ``name``.

    Raises:
        FxadaptError: when the name is not a device, or CUDA is asked for and is missing.
    """
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise FxadaptError(f"invalid --device {name!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FxadaptError(
            f"--device {name} asked for CUDA, which is not available here: use --device cpu"
        )
    return device


class Trainer:
    """Trains a wrapped module with the method's two stages.

    Args:
        wrapped: a module from ``fxadapt.wrap``.
        train_loader: the training batches.
        test_loader: the batches to evaluate after each epoch.
        config: the run's settings.
        objective: the loss and evaluation; supervised cross-entropy by default.
        progress: where to report progress.
        on_epoch: called with the trainer and the epoch's record after every epoch, for
            example to save a checkpoint.
        on_step: called with the trainer, the epoch (from 1) and the step (from 1) after
            every batch, for example to log theta.
    """

    def __init__(
        self,
        wrapped: torch.fx.GraphModule,
        train_loader: DataLoader,
        test_loader: DataLoader,
        config: TrainConfig,
        *,
        objective: Objective | None = None,
        progress: TrainProgress | None = None,
        on_epoch: Callable[[Trainer, EpochRecord], None] | None = None,
        on_step: Callable[[Trainer, int, int], None] | None = None,
    ):
        config.check()
        self.config = config
        self.device = resolve_device(config.device)
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.objective = (objective or Supervised()).to(self.device)
        self.progress = progress or TrainProgress()
        self.on_epoch = on_epoch
        self.on_step = on_step
        self.wrapped = wrapped.to(self.device)
        self.table = edge_table(wrapped)
        self.model: nn.Module = self.wrapped
        self.derived: torch.fx.GraphModule | None = None
        self.history: list[EpochRecord] = []

        self.thetas = arch_parameters(self.wrapped)
        self.weights = weight_parameters(self.wrapped) + self.objective.parameters()
        self.optimizer = self._weight_optimizer(self.weights, config.lr)
        self.arch_optimizer = torch.optim.Adam(
            self.thetas,
            lr=config.arch_lr,
            betas=config.arch_betas,
            weight_decay=config.arch_weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.epochs
        )

    @property
    def stage(self) -> str:
        """Returns ``architecture`` before derivation and ``network`` after it."""
        return "architecture" if self.derived is None else "network"

    def fit(self) -> TrainResult:
        """Runs every epoch of both stages and returns the derived module."""
        torch.manual_seed(self.config.seed)
        if self.config.arch_epochs == 0 and self.derived is None:
            self.derive()
        for epoch in range(len(self.history), self.config.epochs):
            record = self.run_epoch(epoch)
            self.history.append(record)
            self.progress.epoch_done(record)
            if self.derived is None and epoch + 1 == self.config.arch_epochs:
                self.derive()
            if self.on_epoch is not None:
                self.on_epoch(self, record)
        return TrainResult(self.derived, self.table, self.history)

    def run_epoch(self, epoch: int) -> EpochRecord:
        """Trains one epoch (from 0) in the current stage and evaluates the result."""
        stage = self.stage
        self.model.train()
        self.progress.epoch_started(stage, epoch, self.config.epochs, len(self.train_loader))
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss, total_correct, total_seen = 0.0, 0, 0
        started = time.perf_counter()
        for step, batch in enumerate(self.train_loader):
            update_theta = stage == "architecture" and step % self.config.arch_every == 0
            result = self.train_step(batch, update_theta)
            loss = float(result.loss.detach())
            if not math.isfinite(loss):
                raise FxadaptError(
                    f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}: lower "
                    "--lr or --arch-lr; the last checkpoint is from the epoch before"
                )
            total_loss += loss * result.count
            total_seen += result.count
            if result.correct is not None:
                total_correct += result.correct
            accuracy = total_correct / total_seen if result.correct is not None else None
            self.progress.batch_done(
                total_loss / total_seen, accuracy, total_seen / (time.perf_counter() - started)
            )
            if self.on_step is not None:
                self.on_step(self, epoch + 1, step + 1)
        seconds = time.perf_counter() - started
        self.scheduler.step()

        self.model.eval()
        metrics = self.objective.evaluate(self.model, self.test_loader, self.device)
        self.model.train()
        return EpochRecord(
            epoch=epoch + 1,
            stage=stage,
            train_loss=total_loss / max(total_seen, 1),
            train_accuracy=total_correct / total_seen if accuracy is not None else None,
            test_loss=metrics.get("test_loss"),
            test_accuracy=metrics.get("test_accuracy"),
            lr=lr,
            arch_lr=self.config.arch_lr if stage == "architecture" else None,
            images_per_second=total_seen / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            theta=self.theta_values(),
        )

    def train_step(self, batch, update_theta: bool):
        """Takes the weight step (and the theta step when asked) on one batch."""
        if update_theta and self.config.arch_update == "joint":
            return self._joint_step(batch)
        result = self._weight_step(batch)
        if update_theta:
            self._theta_step(batch)
        return result

    def _weight_step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        result = self.objective.batch(self.model, batch, self.device)
        # Only the weights receive gradients here; theta keeps none from this step.
        result.loss.backward(inputs=self.weights)
        self._clip_and_step()
        return result

    def _theta_step(self, batch) -> None:
        self.arch_optimizer.zero_grad(set_to_none=True)
        result = self.objective.batch(self.model, batch, self.device)
        # autograd.grad forms the gradient of theta alone: no weight gradient is computed.
        gradients = torch.autograd.grad(result.loss, self.thetas)
        for theta, gradient in zip(self.thetas, gradients, strict=True):
            theta.grad = gradient
        self.arch_optimizer.step()

    def _joint_step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.arch_optimizer.zero_grad(set_to_none=True)
        result = self.objective.batch(self.model, batch, self.device)
        result.loss.backward(inputs=self.weights + self.thetas)
        self._clip_and_step()
        self.arch_optimizer.step()
        return result

    def _clip_and_step(self) -> None:
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.weights, self.config.grad_clip)
        self.optimizer.step()

    def evaluate(self) -> dict:
        """Returns the objective's evaluation of the current module."""
        self.model.eval()
        try:
            return self.objective.evaluate(self.model, self.test_loader, self.device)
        finally:
            self.model.train()

    def theta_values(self) -> dict[str, dict[str, float]]:
        """Returns theta group name to the theta of each option (empty after derivation)."""
        if self.derived is not None:
            return {}
        mixed = self.wrapped.fxadapt_mixed
        return {name: module.theta() for name, module in mixed.items()}

    def derive(self, decisions: dict[int, str] | None = None) -> None:
        """Derives the network and moves the weight optimizer onto the derived module.

        Args:
            decisions: edge id to option, to apply instead of deciding from theta (when a
                run is restored from a checkpoint).
        """
        derived = derive(self.wrapped, decisions)
        self.table = edge_table(derived)
        name_to_state = self._weight_state_by_name()
        self.derived = derived.to(self.device).train()
        self.model = self.derived
        self.weights = list(self.derived.parameters()) + self.objective.parameters()

        scheduler_state = self.scheduler.state_dict()
        self.optimizer = self._weight_optimizer(self.weights, self.optimizer.param_groups[0]["lr"])
        for name, parameter in self.derived.named_parameters():
            if name in name_to_state:
                self.optimizer.state[parameter] = name_to_state[name]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.config.epochs
        )
        self.scheduler.load_state_dict(scheduler_state)
        self.progress.derived(self.table)

    def _weight_optimizer(self, parameters, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            parameters,
            lr=lr,
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
        )

    def _weight_state_by_name(self) -> dict[str, dict]:
        parameter_to_name = {parameter: name for name, parameter in self.wrapped.named_parameters()}
        return {
            parameter_to_name[parameter]: state
            for parameter, state in self.optimizer.state.items()
            if parameter in parameter_to_name
        }
