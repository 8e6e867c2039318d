"""Self-supervised training with SimCLR, monitored by a weighted k-nearest-neighbour classifier.

SimCLR (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020) trains a backbone without labels. Each training image gives two augmented views.
The backbone turns both into features, and a projection head maps the features to 128-d
vectors. The NT-Xent loss pulls the two views of an image together and pushes them away
from the other 2N - 2 views of the batch. The head trains with the backbone and is
dropped at the end, so what a run keeps and exports is the backbone.

Labels are used only by the monitor. After each epoch it embeds the training images
without augmentation (the memory bank) and the test images with the backbone, and lets the
k nearest bank images vote on each test image's class. Its accuracy measures how well the
features separate the classes, with no classifier trained on them.

The method's settings: two views per image (random resized crop, horizontal flip, colour
jitter with probability 0.8, grayscale with probability 0.2), a 128-d projection, NT-Xent
temperature 0.5, Adam at learning rate 1e-3 for the weights, and k = 200 for the monitor.
fxadapt's choices: the jitter amounts (0.4 for
brightness, contrast and saturation, 0.1 for hue), a crop scale from 0.08 to 1 of the
image area, a hidden layer of the head as wide as the features, and a vote temperature of
0.1 for the monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fxadapt.data import DataBundle
from fxadapt.objectives import BatchResult, Objective

__all__ = [
    "KNN_K",
    "KNN_TEMPERATURE",
    "PROJECTION_DIM",
    "TEMPERATURE",
    "ProjectionHead",
    "SimCLR",
    "TwoViews",
    "knn_accuracy",
    "knn_predict",
    "nt_xent",
    "simclr_augmentation",
    "two_view_bundle",
]

logger = logging.getLogger(__name__)

PROJECTION_DIM = 128
TEMPERATURE = 0.5
KNN_K = 200
KNN_TEMPERATURE = 0.1

# Colour distortion strength s: jitter of 0.8 s in brightness, contrast and saturation and
# 0.2 s in hue. s = 0.5 is fxadapt's choice for 32x32 images.
_COLOR_STRENGTH = 0.5

# Queries per similarity matrix, which bounds its memory to this many rows of bank size.
_KNN_CHUNK = 256


def simclr_augmentation(
    mean: Sequence[float], std: Sequence[float], size: int | tuple[int, int] = 32
) -> v2.Compose:
    """Builds the augmentation of one SimCLR view, from a uint8 image to a normalised one.

    Random resized crop to ``size`` (scale 0.08 to 1), horizontal flip with probability 0.5,
    colour jitter with probability 0.8, grayscale with probability 0.2, then scaling to
    [0, 1] and normalisation with ``mean`` and ``std``.

    Args:
        mean: per-channel mean, in [0, 1] units.
        std: per-channel standard deviation, in [0, 1] units.
        size: output height and width, in pixels.
    """
    strength = _COLOR_STRENGTH
    jitter = v2.ColorJitter(0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([jitter], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class TwoViews(Dataset):
    """Data set of two independently augmented views of each image, with its label.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: int64 tensor of shape (N,). The loss never reads them.
        transform: the augmentation of one view, applied twice per sample.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 tensor of shape (N, C, H, W), "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        image = self.images[index]
        # One image is too small to gain from intra-op threads, and waking them costs more
        # than the work. With torch 2.14 on a 2-core CPU shared with other jobs, a 32x32 view
        # took about 10 times longer with 2 threads than with 1. Loader workers use 1 thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            views = (self.transform(image), self.transform(image))
        finally:
            torch.set_num_threads(threads)
        return views, int(self.labels[index])


def two_view_bundle(bundle: DataBundle) -> DataBundle:
    """Returns a copy of ``bundle`` whose train split yields two SimCLR views per image.

    Raises:
        TypeError: when the bundle's ``train_plain`` does not store its images as a uint8
            tensor (``TensorImageDataset`` does).
    """
    plain = bundle.train_plain
    if not isinstance(getattr(plain, "images", None), torch.Tensor):
        raise TypeError(
            f"SimCLR needs the training images as a tensor, but train_plain is a "
            f"{type(plain).__name__}: load the data with fxadapt.data.load_data"
        )
    transform = simclr_augmentation(bundle.mean, bundle.std, tuple(bundle.input_shape[1:]))
    return replace(bundle, train=TwoViews(plain.images, plain.labels, transform))


class ProjectionHead(nn.Module):
    """Two-layer MLP from backbone features to the space where NT-Xent compares views.

    Args:
        in_features: width of the backbone's (flattened) features.
        hidden_features: width of the hidden layer, by default ``in_features``.
        out_features: width of the projection.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int = PROJECTION_DIM,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.relu(x)
        x = self.fc2(x)
        return x


def nt_xent(first: torch.Tensor, second: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Computes the NT-Xent loss of N pairs of projections, averaged over all 2N views.

    Row i of ``first`` and row i of ``second`` are the two views of one image. Each view is
    classified among the other 2N - 1 views by cosine similarity divided by
    ``temperature``, with its partner as the correct class.

    Args:
        first: projections of the first views, shape (N, D).
        second: projections of the second views, shape (N, D).
        temperature: divisor of the cosine similarities.

    Returns:
        The scalar loss.

    Raises:
        ValueError: when the shapes differ, N is below 2 or the temperature is not positive.
    """
    if first.shape != second.shape or first.dim() != 2:
        raise ValueError(
            f"expected two projections of the same shape (N, D), got {tuple(first.shape)} "
            f"and {tuple(second.shape)}"
        )
    if len(first) < 2:
        raise ValueError(f"NT-Xent needs at least 2 pairs for negatives, got {len(first)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    pairs = len(first)
    views = F.normalize(torch.cat([first, second]), dim=1)
    logits = views @ views.T / temperature
    # A view is never its own negative.
    self_mask = torch.eye(2 * pairs, dtype=torch.bool, device=views.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    index = torch.arange(pairs, device=views.device)
    partners = torch.cat([index + pairs, index])
    return F.cross_entropy(logits, partners)


def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Predicts the class of each query by a weighted vote of its k nearest bank samples.

    Neighbours are ranked by cosine similarity s, and each votes for its class with weight
    exp(s / temperature). When the bank contains fewer than k samples, all of them vote.

    Args:
        bank_features: features of the labelled samples, shape (M, D).
        bank_labels: their classes, shape (M,).
        query_features: features to classify, shape (Q, D).
        num_classes: number of classes.
        k: number of neighbours that vote.
        temperature: divisor of the similarities in the vote weights.

    Returns:
        The predicted classes, shape (Q,).

    Raises:
        ValueError: when k or the temperature is not positive or the bank is empty.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(bank_features) == 0:
        raise ValueError("the kNN bank is empty: it needs at least one labelled sample")

    bank = F.normalize(bank_features.flatten(1).float(), dim=1)
    queries = F.normalize(query_features.flatten(1).float(), dim=1)
    bank_labels = bank_labels.to(bank.device)
    neighbours = min(k, len(bank))
    predictions = []
    for chunk in queries.split(_KNN_CHUNK):
        similarity, index = (chunk @ bank.T).topk(neighbours, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(chunk), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Returns the fraction of queries whose class ``knn_predict`` gets right.

    Raises:
        ValueError: when there are no queries, or for the reasons ``knn_predict`` gives.
    """
    if len(query_labels) == 0:
        raise ValueError("query_labels is empty: pass at least one query to classify")
    num_classes = int(torch.cat([bank_labels, query_labels]).max()) + 1
    predicted = knn_predict(
        bank_features,
        bank_labels,
        query_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
    )
    correct = int((predicted.cpu() == query_labels.cpu()).sum())
    return correct / len(query_labels)


class SimCLR(Objective):
    """SimCLR objective: NT-Xent on two views per image, evaluated by the weighted kNN monitor.

    A training batch is ``((first_views, second_views), labels)`` as ``TwoViews`` yields it.
    Both views go through the model in one forward, so BatchNorm normalises them together.
    The model outputs features; a tuple output counts by its first element, and features of
    more than one dimension per sample are flattened.

    Args:
        bank_loader: the training images without augmentation, with labels; the memory bank
            of the monitor.
        feature_dim: width of the model's flattened features.
        temperature: NT-Xent temperature.
        knn_k: neighbours that vote in the monitor.
        knn_temperature: temperature of the monitor's vote weights.
        projection_dim: width of the projection head's output.
    """

    name = "simclr"

    def __init__(
        self,
        bank_loader: DataLoader,
        feature_dim: int,
        *,
        temperature: float = TEMPERATURE,
        knn_k: int = KNN_K,
        knn_temperature: float = KNN_TEMPERATURE,
        projection_dim: int = PROJECTION_DIM,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if knn_k < 1:
            raise ValueError(f"knn_k must be at least 1, got {knn_k}")
        if knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be positive, got {knn_temperature}")
        self.bank_loader = bank_loader
        self.temperature = temperature
        self.knn_k = knn_k
        self.knn_temperature = knn_temperature
        self.head = ProjectionHead(feature_dim, out_features=projection_dim)

    def batch(self, model: nn.Module, batch, device: torch.device) -> BatchResult:
        (first, second), _ = batch
        views = torch.cat([first, second]).to(device, non_blocking=True)
        projections = self.head(_features(model, views))
        first_projections, second_projections = projections.chunk(2)
        loss = nt_xent(first_projections, second_projections, self.temperature)
        return BatchResult(loss, None, len(first))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
        """Returns ``test_accuracy``, the kNN accuracy on ``loader``, and no ``test_loss``."""
        bank_features, bank_labels = _embed(model, self.bank_loader, device)
        test_features, test_labels = _embed(model, loader, device)
        accuracy = knn_accuracy(
            bank_features,
            bank_labels,
            test_features,
            test_labels,
            k=self.knn_k,
            temperature=self.knn_temperature,
        )
        return {"test_loss": None, "test_accuracy": accuracy}

    def parameters(self) -> list[nn.Parameter]:
        """Returns the projection head's weights."""
        return list(self.head.parameters())

    def to(self, device: torch.device) -> SimCLR:
        """Moves the projection head to ``device``."""
        self.head.to(device)
        return self


def _features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    outputs = model(images)
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return outputs.flatten(1)


def _embed(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for images, batch_labels in loader:
        features.append(_features(model, images.to(device, non_blocking=True)))
        labels.append(batch_labels.to(device))
    return torch.cat(features), torch.cat(labels)
