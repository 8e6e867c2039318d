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
clipping at norm 5 for the weights. ``optimizer="adam"`` trains the weights with Adam
(default betas, the same weight decay and cosine schedule) instead of SGD.

Two faster variants depart from the method and are never the default: ``arch_update="joint"``
takes the gradients of the weights and of theta from one forward and backward pass, and
``arch_every=K`` takes a theta step on every K-th batch only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.fx
from torch import nn
from torch.utils.data import DataLoader

from fxadapt.api import arch_parameters, derive, edge_table, fuse, weight_parameters
from fxadapt.distributed import Parallelism
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError, NonFiniteLossError
from fxadapt.objectives import Objective, Supervised
from fxadapt.rng import restore_rng_state

__all__ = [
    "ARCH_UPDATES",
    "OPTIMIZERS",
    "TrainConfig",
    "EpochRecord",
    "EpochTotals",
    "TrainingStopped",
    "TrainProgress",
    "TrainResult",
    "Trainer",
    "resolve_device",
]

logger = logging.getLogger(__name__)

ARCH_UPDATES = ("alternate", "joint")

# Optimizers that ``TrainConfig.optimizer`` accepts for the weights. Theta always uses Adam.
OPTIMIZERS = ("sgd", "adam")


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
        optimizer: optimizer of the weights, ``sgd`` (with ``momentum``) or ``adam``.
        arch_lr: learning rate of theta.
        arch_betas: Adam betas of theta.
        arch_weight_decay: weight decay of theta.
        arch_update: ``alternate`` (the method: a weight step, then a theta step on the same
            batch) or ``joint`` (both from one backward pass; faster, a deviation).
        arch_every: take a theta step on every K-th batch of the architecture stage.
        grad_clip: maximum gradient norm of the weights, or None for no clipping.
        drop_path: the drop-path probability of the last epoch, ramped linearly from 0 at
            the first epoch. It is set on every ``nn.Dropout3d`` whose module path contains
            ``drop_path`` (how the zoo's DARTS builds its drop paths, so that tracing does
            not freeze them). None means 0 unless the model's training defaults say more.
        seed: seed of every random number generator the run uses.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
    """

    epochs: int = 10
    arch_epochs: int = 5
    batch_size: int = 128
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    optimizer: str = "sgd"
    arch_lr: float = 1e-3
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 0.0
    arch_update: str = "alternate"
    arch_every: int = 1
    grad_clip: float | None = 5.0
    drop_path: float | None = None
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        """Raises FxadaptError when the settings contradict each other."""
        if self.epochs < 1:
            raise FxadaptError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.arch_epochs <= self.epochs:
            raise FxadaptError(
                f"--arch-epochs {self.arch_epochs} must be between 0 and --epochs {self.epochs}: "
                "lower --arch-epochs or raise --epochs"
            )
        if self.batch_size < 1:
            raise FxadaptError(f"--batch-size must be at least 1, got {self.batch_size}")
        for option, value in (("--lr", self.lr), ("--arch-lr", self.arch_lr)):
            if value is not None and not value > 0:
                raise FxadaptError(f"{option} must be a positive learning rate, got {value}")
        if self.weight_decay < 0:
            raise FxadaptError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise FxadaptError(f"--grad-clip must be positive, or 0 for none, got {self.grad_clip}")
        if self.drop_path is not None and not 0 <= self.drop_path < 1:
            raise FxadaptError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        if self.optimizer not in OPTIMIZERS:
            raise FxadaptError(
                f"invalid --optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )
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
class EpochTotals:
    """Running sums of the epoch in progress, kept so that a stopped epoch can continue.

    Attributes:
        epoch: the epoch, from 0.
        steps: batches trained so far.
        loss_sum: the sum of batch loss times batch size.
        correct: correctly classified samples, or None when the objective counts none.
        seen: samples trained so far.
        seconds: training time so far.
        rng_state: the global generators' state after the last trained batch (see
            ``fxadapt.rng``), restored when the epoch continues; None while it runs.
    """

    epoch: int
    steps: int = 0
    loss_sum: float = 0.0
    correct: int | None = None
    seen: int = 0
    seconds: float = 0.0
    rng_state: dict | None = None


class TrainingStopped(Exception):
    """Raised by ``Trainer.fit`` at a batch boundary after ``stop_requested`` was set.

    Attributes:
        totals: the sums of the unfinished epoch, or None when it stopped between epochs.
    """

    def __init__(self, totals: EpochTotals | None):
        super().__init__("training stopped on request")
        self.totals = totals


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
            f"--device {name} requests CUDA, which is not available here: use --device cpu"
        )
    return device


class _frozen_batch_statistics:
    """Keeps BatchNorm's running statistics unchanged for the duration of a ``with`` block.

    The theta step runs the same batch forward a second time; with momentum 0 BatchNorm still
    normalises with the batch's statistics but does not count the batch twice in its
    running averages.
    """

    def __init__(self, norms: list[nn.modules.batchnorm._BatchNorm]):
        self.norms = norms

    def __enter__(self):
        self.momenta = [layer.momentum for layer in self.norms]
        for layer in self.norms:
            layer.momentum = 0.0

    def __exit__(self, *exc_info):
        for layer, momentum in zip(self.norms, self.momenta, strict=True):
            layer.momentum = momentum


class _no_gradient_for:
    """Turns ``requires_grad`` off for some parameters for the duration of a ``with`` block.

    A forward pass in the block records nothing for those parameters. The weight step then
    saves no activation for theta gradients it never takes, and the theta step records no
    graph for the layers before the first mixed edge.
    """

    def __init__(self, parameters: list[nn.Parameter]):
        self.parameters = parameters

    def __enter__(self):
        self.flags = [parameter.requires_grad for parameter in self.parameters]
        for parameter in self.parameters:
            parameter.requires_grad_(False)

    def __exit__(self, *exc_info):
        for parameter, flag in zip(self.parameters, self.flags, strict=True):
            parameter.requires_grad_(flag)


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
        parallel: how to work with other training processes (``fxadapt.distributed``);
            one process alone by default.

    Attributes:
        stop_requested: set it (from a signal handler, say) to make ``fit`` raise
            ``TrainingStopped`` after the current batch.
        resume_totals: the sums of an unfinished epoch to continue, from a checkpoint.
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
        parallel: Parallelism | None = None,
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
        self.parallel = parallel or Parallelism()
        self.wrapped = wrapped.to(self.device)
        self.wrapped_norms = [
            layer
            for layer in self.wrapped.modules()
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.momentum is not None
        ]
        self.table = edge_table(wrapped)
        # The architecture stage runs the fused graph: the same weights and theta as
        # ``wrapped``, with each merge of mixed edges computed in one pass.
        self.fused = fuse(self.wrapped)
        self.model: nn.Module = self.parallel.wrap(self.fused)
        self.derived: torch.fx.GraphModule | None = None
        self.history: list[EpochRecord] = []
        self.stop_requested = False
        self.resume_totals: EpochTotals | None = None

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
        """Runs every epoch of both stages and returns the derived module.

        A trainer restored from a checkpoint continues from its history (and its unfinished
        epoch) with the restored generators instead of seeding them again.

        Raises:
            TrainingStopped: when ``stop_requested`` is set; the state is that of a batch
                boundary, ready to be saved.
            FxadaptError: when the loss becomes NaN or infinite.
        """
        if not self.history and self.resume_totals is None:
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
        """Trains one epoch (from 0) in the current stage and evaluates the result.

        An epoch in ``resume_totals`` continues after its last trained batch.
        """
        stage = self.stage
        self._set_drop_path(epoch)
        self.model.train()
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            # A DistributedSampler draws each epoch's order from its seed and the epoch.
            sampler.set_epoch(epoch)
        self.progress.epoch_started(stage, epoch, self.config.epochs, len(self.train_loader))
        lr = self.optimizer.param_groups[0]["lr"]
        totals, batches = self._start_epoch(epoch)
        started = time.perf_counter() - totals.seconds
        for step, batch in enumerate(batches, start=totals.steps):
            update_theta = stage == "architecture" and step % self.config.arch_every == 0
            result = self.train_step(batch, update_theta)
            loss = float(result.loss.detach())
            # Every process learns of a bad loss or a stop request at the same step.
            non_finite, stop = self.parallel.any_flags(
                [not math.isfinite(loss), self.stop_requested]
            )
            if non_finite:
                raise NonFiniteLossError(loss, epoch + 1, step + 1)
            totals.steps = step + 1
            totals.loss_sum += loss * result.count
            totals.seen += result.count
            if result.correct is not None:
                totals.correct = (totals.correct or 0) + result.correct
            accuracy = None if totals.correct is None else totals.correct / totals.seen
            speed = totals.seen / (time.perf_counter() - started)
            self.progress.batch_done(totals.loss_sum / totals.seen, accuracy, speed)
            if self.on_step is not None:
                self.on_step(self, epoch + 1, step + 1)
            if stop:
                totals.seconds = time.perf_counter() - started
                raise TrainingStopped(totals)
        totals.seconds = time.perf_counter() - started
        self.scheduler.step()
        loss_sum, correct, seen = self.parallel.sum_values(
            [totals.loss_sum, totals.correct or 0, totals.seen]
        )

        self.model.eval()
        metrics = self.objective.evaluate(self.model, self.test_loader, self.device)
        self.model.train()
        return EpochRecord(
            epoch=epoch + 1,
            stage=stage,
            train_loss=loss_sum / max(seen, 1),
            train_accuracy=None if totals.correct is None else correct / seen,
            test_loss=metrics.get("test_loss"),
            test_accuracy=metrics.get("test_accuracy"),
            lr=lr,
            arch_lr=self.config.arch_lr if stage == "architecture" else None,
            images_per_second=seen / totals.seconds if totals.seconds > 0 else 0.0,
            seconds=totals.seconds,
            theta=self.theta_values(),
        )

    def _start_epoch(self, epoch: int) -> tuple[EpochTotals, Iterator]:
        """Returns the epoch's running sums and its batches, continued from ``resume_totals``."""
        batches = iter(self.train_loader)
        totals, self.resume_totals = self.resume_totals, None
        if totals is None:
            return EpochTotals(epoch), batches
        if totals.epoch != epoch:
            raise ValueError(f"resume_totals belong to epoch {totals.epoch}, not {epoch}")
        # Loading the trained batches again moves the loader to the same place in the same
        # order. The generators then go back to their state after the last trained batch.
        for _ in range(totals.steps):
            next(batches)
        if totals.rng_state is not None:
            restore_rng_state(totals.rng_state, self.device)
            totals.rng_state = None
        return totals, batches

    def train_step(self, batch, update_theta: bool):
        """Takes the weight step (and the theta step when asked) on one batch."""
        if update_theta and self.config.arch_update == "joint":
            return self._joint_step(batch)
        result = self._weight_step(batch)
        if update_theta:
            # Weight gradients held through the theta step would sit between its activations
            # in the CPU heap and make the process's peak resident memory grow.
            self.optimizer.zero_grad(set_to_none=True)
            self._theta_step(batch)
        return result

    def _weight_step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        thetas = self.thetas if self.derived is None else []
        with _no_gradient_for(thetas):
            result = self.objective.batch(self.model, batch, self.device)
        # Only the weights receive gradients here; theta keeps none from this step.
        result.loss.backward(inputs=self.weights)
        self._clip_and_step()
        return result

    def _theta_step(self, batch) -> None:
        self.arch_optimizer.zero_grad(set_to_none=True)
        # The fused module without its DDP wrapper: DDP would wait for weight gradients
        # that this step never computes.
        with _frozen_batch_statistics(self.wrapped_norms), _no_gradient_for(self.weights):
            result = self.objective.batch(self.fused, batch, self.device)
        # autograd.grad forms the gradient of theta alone: no weight gradient is computed.
        gradients = torch.autograd.grad(result.loss, self.thetas)
        for theta, gradient in zip(self.thetas, gradients, strict=True):
            theta.grad = gradient
        self.parallel.average_gradients(self.thetas)
        self.arch_optimizer.step()

    def _joint_step(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        self.arch_optimizer.zero_grad(set_to_none=True)
        result = self.objective.batch(self.model, batch, self.device)
        result.loss.backward(inputs=self.weights + self.thetas)
        self._clip_and_step()
        self.parallel.average_gradients(self.thetas)
        self.arch_optimizer.step()
        return result

    def _set_drop_path(self, epoch: int) -> None:
        probability = (self.config.drop_path or 0.0) * epoch / max(self.config.epochs - 1, 1)
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Dropout3d) and "drop_path" in name:
                module.p = probability

    def _clip_and_step(self) -> None:
        # The objective's own weights (a projection head) are outside the DDP wrapper.
        self.parallel.average_gradients(self.objective.parameters())
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
        if decisions is None:
            # Every process derives from rank 0's theta, so all make the same decisions.
            self.parallel.broadcast_tensors(self.thetas)
        derived = derive(self.wrapped, decisions)
        self.table = edge_table(derived)
        self.parallel.check_same_decisions({edge.id: edge.decision for edge in self.table.edges})
        name_to_state = self._weight_state_by_name()
        # The objective's own weights (a projection head) survive derivation unchanged.
        objective_state = dict(self.optimizer.state)
        self.derived = derived.to(self.device).train()
        self.model = self.parallel.wrap(self.derived)
        self.weights = list(self.derived.parameters()) + self.objective.parameters()

        scheduler_state = self.scheduler.state_dict()
        self.optimizer = self._weight_optimizer(self.weights, self.optimizer.param_groups[0]["lr"])
        for name, parameter in self.derived.named_parameters():
            if name in name_to_state:
                self.optimizer.state[parameter] = name_to_state[name]
        for parameter in self.objective.parameters():
            if parameter in objective_state:
                self.optimizer.state[parameter] = objective_state[parameter]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=self.config.epochs
        )
        self.scheduler.load_state_dict(scheduler_state)
        self.progress.derived(self.table)

    def _weight_optimizer(self, parameters, lr: float) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=lr, weight_decay=self.config.weight_decay)
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
