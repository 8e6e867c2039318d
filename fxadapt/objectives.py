"""Training objectives: what the loss of a batch is and how a model is evaluated.

The trainer calls an objective for every weight step, theta step and evaluation, so the same
alternating schedule serves supervised and self-supervised training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["BatchResult", "Objective", "Supervised", "AUX_WEIGHT"]

# Weight of an auxiliary head's loss, as in the DARTS networks.
AUX_WEIGHT = 0.4


@dataclass
class BatchResult:
    """The loss of one batch and the counts that make its running accuracy.

    Attributes:
        loss: the scalar loss, attached to the graph.
        correct: how many samples the model got right, or None when the objective has no
            accuracy for a training batch.
        count: how many samples the batch holds.
    """

    loss: torch.Tensor
    correct: int | None
    count: int


class Objective:
    """The loss of a batch and the evaluation of a model; subclasses define both."""

    name = "objective"

    def batch(self, model: nn.Module, batch, device: torch.device) -> BatchResult:
        """Returns the loss of ``model`` on one batch of the training loader."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
        """Returns ``test_loss`` and ``test_accuracy`` of ``model`` (either may be None)."""
        raise NotImplementedError

    def parameters(self) -> list[nn.Parameter]:
        """Returns weights the objective itself trains with the model's weights."""
        return []

    def to(self, device: torch.device) -> Objective:
        """Moves the objective's own modules to ``device``."""
        return self


class Supervised(Objective):
    """Cross-entropy on labels; a second model output is an auxiliary head weighted 0.4."""

    name = "supervised"

    def __init__(self):
        self.criterion = nn.CrossEntropyLoss()

    def batch(self, model: nn.Module, batch, device: torch.device) -> BatchResult:
        images, labels = batch
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss, logits = self._loss(model(images), labels)
        correct = int((logits.detach().argmax(dim=1) == labels).sum())
        return BatchResult(loss, correct, len(labels))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
        total_loss, total_correct, total_seen = 0.0, 0, 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss, logits = self._loss(model(images), labels)
            total_loss += float(loss) * len(labels)
            total_correct += int((logits.argmax(dim=1) == labels).sum())
            total_seen += len(labels)
        seen = max(total_seen, 1)
        return {"test_loss": total_loss / seen, "test_accuracy": total_correct / seen}

    def _loss(self, outputs, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(outputs, (tuple, list)):
            logits, auxiliary = outputs[0], outputs[1]
            loss = self.criterion(logits, labels) + AUX_WEIGHT * self.criterion(auxiliary, labels)
            return loss, logits
        return self.criterion(outputs, labels), outputs
