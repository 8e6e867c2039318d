"""Faster training on CUDA: data held on the GPU, augmentation there, channels-last, bf16.

The loaders of :func:`fxadapt.data.make_loaders` augment every sample in Python on the CPU and
copy each batch to the GPU. On a GPU that loop, not the network, sets the speed of a small
model such as ResNet20. :class:`DeviceLoader` copies a whole split to the GPU once, through
pinned memory, and augments each batch there with a few batched tensor operations. It applies
the same random crop with zero padding, horizontal flip and normalisation as the CPU path.

:func:`to_channels_last` stores a model's 4-D weights in channels-last order, which the
convolutions of cuDNN prefer; :class:`DeviceLoader` gives channels-last batches to match.
:class:`AutocastObjective` runs an objective's forward passes under bf16 autocast.

NOTE: these paths have run on CPU tensors only, because no GPU was at hand. Their speed on
CUDA has not been measured.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from fxadapt.data import DataBundle, TensorImageDataset
from fxadapt.objectives import Objective

__all__ = ["AutocastObjective", "DeviceLoader", "device_loaders", "to_channels_last"]

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceLoader:
    """Batches of an in-memory image split, kept on one device and augmented there.

    Iterating gives ``(images, labels)`` pairs on ``device``: float images normalised with
    ``mean`` and ``std``, int64 labels. Each new iteration is a new epoch, with a new order
    when ``shuffle`` is set. The order and the augmentation come from generators seeded with
    ``seed``, so two loaders with the same arguments give the same batches.

    Args:
        dataset: the split, whose uint8 ``images`` (N, C, H, W) and ``labels`` are used.
        batch_size: samples per batch.
        device: where the split and the batches live.
        mean: per-channel mean, in [0, 1] units.
        std: per-channel standard deviation, in [0, 1] units.
        shuffle: whether each epoch visits the samples in a new random order.
        crop_padding: pixels of zero padding of the random crop; 0 turns the crop off.
        flip: whether to flip each image horizontally with probability 1/2.
        seed: seed of the order and of the augmentation.
        drop_last: whether to drop the last, incomplete batch.
        channels_last: whether the batches are in channels-last memory order.

    Raises:
        ValueError: when ``batch_size`` is below 1 or the split has the wrong layout.
    """

    def __init__(
        self,
        dataset: TensorImageDataset,
        batch_size: int,
        device: torch.device | str,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        shuffle: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        channels_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        images = dataset.images
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"the split must hold uint8 images of shape (N, C, H, W), got {images.dtype} "
                f"of shape {tuple(images.shape)}: pass a split from fxadapt.data.load_data"
            )
        self.device = torch.device(device)
        self.images = _to_device(images, self.device)
        self.labels = _to_device(dataset.labels, self.device)
        channels = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, channels, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, channels, 1, 1)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.crop_padding = crop_padding
        self.flip = flip
        self.drop_last = drop_last
        self.channels_last = channels_last
        # The order is drawn on the CPU, where randperm is cheap and needs no device generator.
        self.order_generator = torch.Generator().manual_seed(seed)
        self.augment_generator = torch.Generator(device=self.device).manual_seed(seed)

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.images) // self.batch_size
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.images)
        if self.shuffle:
            order = torch.randperm(count, generator=self.order_generator).to(self.device)
        else:
            order = torch.arange(count, device=self.device)
        for batch in range(len(self)):
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield self._prepare(self.images[index]), self.labels[index]

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.crop_padding > 0:
            images = _random_crop(images, self.crop_padding, self.augment_generator)
        if self.flip:
            images = _random_flip(images, self.augment_generator)
        images = (images.float() / 255 - self.mean) / self.std
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


def device_loaders(
    bundle: DataBundle,
    batch_size: int,
    device: torch.device | str,
    *,
    seed: int = 0,
    drop_last: bool = False,
    channels_last: bool = False,
) -> tuple[DeviceLoader, DeviceLoader]:
    """Builds the train and test loaders of a bundle with both splits on ``device``.

    The train loader shuffles and applies the bundle's augmentation: a random crop padded by
    ``bundle.crop_padding`` and, when ``bundle.flip`` is set, a horizontal flip. The test
    loader keeps the order of the split and does not augment.

    Raises:
        ValueError: when a split is not a :class:`fxadapt.data.TensorImageDataset`.
    """
    for split_name, split in (("train", bundle.train), ("test", bundle.test)):
        if not isinstance(split, TensorImageDataset):
            raise ValueError(
                f"the {split_name} split of {bundle.name} is a {type(split).__name__}, not an "
                "in-memory TensorImageDataset: use fxadapt.data.make_loaders instead"
            )
    common = {"mean": bundle.mean, "std": bundle.std, "channels_last": channels_last}
    train = DeviceLoader(
        bundle.train,
        batch_size,
        device,
        shuffle=True,
        crop_padding=bundle.crop_padding,
        flip=bundle.flip,
        seed=seed,
        drop_last=drop_last,
        **common,
    )
    test = DeviceLoader(bundle.test, batch_size, device, **common)
    return train, test


def to_channels_last(model: nn.Module) -> nn.Module:
    """Stores the 4-D weights of ``model`` in channels-last order, in place, and returns it."""
    return model.to(memory_format=torch.channels_last)


class AutocastObjective(Objective):
    """Runs another objective's loss and evaluation under autocast.

    Args:
        objective: the objective to run, for example ``Supervised()``.
        dtype: ``bf16`` or ``fp16``. bf16 needs no loss scaling; fp16 without a gradient
            scaler can underflow, so prefer bf16.
        device_type: the device type autocast applies to, ``cuda`` by default.

    Raises:
        ValueError: when ``dtype`` is not one of ``bf16`` and ``fp16``.
    """

    def __init__(self, objective: Objective, dtype: str = "bf16", device_type: str = "cuda"):
        if dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"invalid autocast dtype {dtype!r}: use one of bf16, fp16")
        self.objective = objective
        self.name = objective.name
        self.dtype = AUTOCAST_DTYPES[dtype]
        self.device_type = device_type

    def batch(self, model: nn.Module, batch, device: torch.device):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.objective.batch(model, batch, device)

    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device) -> dict:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.objective.evaluate(model, loader, device)

    def parameters(self) -> list[nn.Parameter]:
        return self.objective.parameters()

    def to(self, device: torch.device) -> AutocastObjective:
        self.objective = self.objective.to(device)
        return self


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    # A copy from pinned memory can overlap other work; the synchronisation makes sure the
    # split is complete before the first batch reads it.
    on_device = tensor.pin_memory().to(device, non_blocking=True)
    torch.cuda.synchronize(device)
    return on_device


def _random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crops every image at its own random offset from a copy padded with zeros on all sides."""
    count, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (count, 1, 1), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (count, 1, 1), device=device, generator=generator)
    rows = top + torch.arange(height, device=device).view(1, height, 1)
    columns = left + torch.arange(width, device=device).view(1, 1, width)
    samples = torch.arange(count, device=device).view(count, 1, 1)
    # Advanced indexing puts the indexed dimensions first: (N, H, W, C).
    cropped = padded.permute(0, 2, 3, 1)[samples, rows, columns]
    return cropped.permute(0, 3, 1, 2).contiguous()


def _random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flips = torch.rand(len(images), device=images.device, generator=generator) < 0.5
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(3), images)
