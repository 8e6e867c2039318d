"""Training: the architecture stage with alternating weight and theta steps, then the network stage.

Architecture stage, for every mini-batch: one step of the weights on the batch, then one
step of theta on the same batch with the updated weights. All training data trains the
weights; there is no held-out split. After the architecture epochs the network is derived,
and the network stage trains the derived module's weights only. The weight optimizer keeps
the state of the weights that survive, and the learning-rate schedule runs over the total
epoch count.

Choices that are ours, not the method's (every one is an option): SGD with momentum 0.9,
weight decay 3e-4 and a cosine schedule for the weights (learning rate 0.025, as in the
method's experiments); Adam with learning rate 1e-3, betas (0.5, 0.999) and no weight decay
for theta (weight decay would pull every theta towards 0 and so towards none); gradient
clipping at norm 5 for the weights.
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

__all__ = ["TrainConfig", "EpochRecord", "TrainProgress", "TrainResult", "Trainer", "resolve_device"]

logger = logging.getLogger(__name__)

AUX_WEIGHT = 0.4


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


@dataclass
class EpochRecord:
    """What one epoch measured; one line of ``metrics.jsonl``."""

    epoch: int
    stage: str
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
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

    def batch_done(self, loss: float, accuracy: float, images_per_second: float) -> None:
        """Called after every batch with running averages over the epoch."""

    def epoch_done(self, record: EpochRecord) -> None:
        """Called after the epoch's evaluation."""

    def derived(self, table: EdgeTable) -> None:
        """Called once the decisions are made."""


def resolve_device(name: str) -> torch.device:
    """Returns the torch device for ``name``.

    Raises:
        FxadaptError: when CUDA is asked for and is not available.
    """
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FxadaptError(f"--device {name} asked for CUDA, which is not available: use --device cpu")
    return device


class Trainer:
    """Trains a wrapped module with the method's two stages.

    Args:
        wrapped: a module from ``fxadapt.wrap``.
        train_loader: the training batches.
        test_loader: the batches to evaluate after each epoch.
        config: the run's settings.
        progress: where to report progress.
        on_epoch: called with the trainer after every epoch, for example to save a
            checkpoint.
    """

    def __init__(
        self,
        wrapped: torch.fx.GraphModule,
        train_loader: DataLoader,
        test_loader: DataLoader,
        config: TrainConfig,
        *,
        progress: TrainProgress | None = None,
        on_epoch: Callable[[Trainer, EpochRecord], None] | None = None,
    ):
        config.check()
        self.config = config
        self.device = resolve_device(config.device)
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.progress = progress or TrainProgress()
        self.on_epoch = on_epoch
        self.wrapped = wrapped.to(self.device)
        self.table = edge_table(wrapped)
        self.model: nn.Module = self.wrapped
        self.derived: torch.fx.GraphModule | None = None
        self.history: list[EpochRecord] = []
        self.criterion = nn.CrossEntropyLoss()

        self.weights = weight_parameters(self.wrapped)
        self.thetas = arch_parameters(self.wrapped)
        self.optimizer = torch.optim.SGD(
            self.weights,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.arch_optimizer = torch.optim.Adam(
            self.thetas,
            lr=config.arch_lr,
            betas=config.arch_betas,
            weight_decay=config.arch_weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=config.epochs
        )

    def fit(self) -> TrainResult:
        """Runs every epoch of both stages and returns the derived module."""
        torch.manual_seed(self.config.seed)
        if self.config.arch_epochs == 0:
            self._derive()
        for epoch in range(self.config.epochs):
            stage = "architecture" if self.derived is None else "network"
            record = self._run_epoch(epoch, stage)
            self.history.append(record)
            self.progress.epoch_done(record)
            if self.on_epoch is not None:
                self.on_epoch(self, record)
            if self.derived is None and epoch + 1 == self.config.arch_epochs:
                self._derive()
        return TrainResult(self.derived, self.table, self.history)

    def _run_epoch(self, epoch: int, stage: str) -> EpochRecord:
        self.model.train()
        batches = len(self.train_loader)
        self.progress.epoch_started(stage, epoch, self.config.epochs, batches)
        lr = self.optimizer.param_groups[0]["lr"]
        total_loss, total_correct, total_seen = 0.0, 0, 0
        started = time.perf_counter()
        for step, (images, labels) in enumerate(self.train_loader):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss, correct = self._weight_step(images, labels)
            if stage == "architecture":
                self._theta_step(images, labels)
            if not math.isfinite(loss):
                raise FxadaptError(
                    f"the loss became {loss} at epoch {epoch + 1}, step {step + 1}: lower --lr "
                    "or --arch-lr"
                )
            total_loss += loss * len(labels)
            total_correct += correct
            total_seen += len(labels)
            elapsed = time.perf_counter() - started
            self.progress.batch_done(
                total_loss / total_seen, total_correct / total_seen, total_seen / elapsed
            )
        seconds = time.perf_counter() - started
        self.scheduler.step()
        test_loss, test_accuracy = self.evaluate()
        return EpochRecord(
            epoch=epoch + 1,
            stage=stage,
            train_loss=total_loss / max(total_seen, 1),
            train_accuracy=total_correct / max(total_seen, 1),
            test_loss=test_loss,
            test_accuracy=test_accuracy,
            lr=lr,
            arch_lr=self.config.arch_lr if stage == "architecture" else None,
            images_per_second=total_seen / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            theta=self.theta_values(),
        )

    def _loss(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and the main logits; a second output is an auxiliary head."""
        if isinstance(outputs, (tuple, list)):
            logits, auxiliary = outputs[0], outputs[1]
            loss = self.criterion(logits, labels) + AUX_WEIGHT * self.criterion(auxiliary, labels)
            return loss, logits
        return self.criterion(outputs, labels), outputs

    def _weight_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
        parameters = self.weights if self.derived is None else self.derived_weights
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._loss(self.model(images), labels)
        # Only the weights receive gradients here; theta keeps none from this step.
        loss.backward(inputs=parameters)
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(parameters, self.config.grad_clip)
        self.optimizer.step()
        correct = int((logits.argmax(dim=1) == labels).sum())
        return float(loss.detach()), correct

    def _theta_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.arch_optimizer.zero_grad(set_to_none=True)
        loss, _ = self._loss(self.model(images), labels)
        # autograd.grad computes the gradient of theta alone: no weight gradient is formed.
        gradients = torch.autograd.grad(loss, self.thetas)
        for theta, gradient in zip(self.thetas, gradients):
            theta.grad = gradient
        self.arch_optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Returns the loss and accuracy of the current module on the test loader."""
        self.model.eval()
        total_loss, total_correct, total_seen = 0.0, 0, 0
        for images, labels in self.test_loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss, logits = self._loss(self.model(images), labels)
            total_loss += float(loss) * len(labels)
            total_correct += int((logits.argmax(dim=1) == labels).sum())
            total_seen += len(labels)
        self.model.train()
        return total_loss / max(total_seen, 1), total_correct / max(total_seen, 1)

    def theta_values(self) -> dict[str, dict[str, float]]:
        """Returns theta group name to the theta of each option (empty after derivation)."""
        if self.derived is not None:
            return {}
        mixed = self.wrapped.fxadapt_mixed
        return {name: module.theta() for name, module in mixed.items()}

    def _derive(self) -> None:
        """Derives the network and moves the weight optimizer onto the derived module."""
        derived = derive(self.wrapped)
        self.table = edge_table(derived)
        name_to_state = self._weight_state_by_name()
        self.derived = derived.to(self.device)
        self.derived.train()
        self.model = self.derived
        self.derived_weights = list(self.derived.parameters())
        old_scheduler_state = self.scheduler.state_dict()
        old_lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer = torch.optim.SGD(
            self.derived_weights,
            lr=old_lr,
            momentum=self.config.momentum,
            weight_decay=self.config.weight_decay,
        )
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
        for name, parameter in self.derived.named_parameters():
            if name in name_to_state:
                self.optimizer.state[parameter] = name_to_state[name]
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.config.epochs
        )
        self.scheduler.load_state_dict(old_scheduler_state)
        self.progress.derived(self.table)

    def _weight_state_by_name(self) -> dict[str, dict]:
        parameter_to_name = {
            parameter: name for name, parameter in self.wrapped.named_parameters()
        }
        return {
            parameter_to_name[parameter]: state
            for parameter, state in self.optimizer.state.items()
            if parameter in parameter_to_name
        }
