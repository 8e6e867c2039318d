"""Image data sets for training: loading, decoding, caching, augmentation and loaders.

Every data set is held in memory as one uint8 tensor of shape (N, 3, H, W) per split, with
an int64 label tensor beside it. Augmentation runs per sample on those tensors with
``torchvision.transforms.v2``, so no image is decoded again after the first load.

Data sets (``name`` of :func:`load_data`):

- ``digits``: the UCI handwritten digits embedded in the package (1,797 images of 8×8
  pixels), served at CIFAR geometry: upsampled to 32×32 with bilinear interpolation,
  scaled to [0, 1] and replicated to 3 channels. A fixed, class-stratified split keeps 80%
  of every class for training and 20% for testing. Augmentation is a random crop with
  2 pixels of padding and never a flip, because a mirrored digit can read as another digit.
- ``cifar10``: an image-folder tree (``train/<class>/``, ``test/<class>/``) or torchvision's
  CIFAR-10 batch files. Images of a tree are resized to 32×32 where they differ.
  Augmentation is a random crop with 4 pixels of padding and a horizontal flip.
- ``imagefolder``: any ``train/<class>/`` tree with ``test/<class>/`` or ``val/<class>/``.
  Every image is resized to the size of the first train image: the first file, in sorted
  order, that decodes. Augmentation is a random crop padded by an eighth of the image
  height and a horizontal flip.
- ``tinyimagenet``: the Tiny ImageNet layout, with ``train/<wnid>/images/`` and the
  validation images labelled by ``val/val_annotations.txt``. Images are resized to 64×64
  where they differ. Augmentation is a random crop with 8 pixels of padding and a
  horizontal flip.

Every image is decoded as RGB, so grayscale and RGBA files get 3 channels. Images are
normalised with the CIFAR-10 channel statistics (``cifar10``), the ImageNet statistics
(``tinyimagenet``) or the statistics of the decoded train split (``digits`` and
``imagefolder``).

Decoded image trees are cached as tensor files under ``cache_dir``. The cache key covers the
absolute split folder, the class list, the image size, the number of files and the newest
modification time of the files and folders listed. Adding, removing or editing a file
therefore makes the next load decode again. Old cache files are never deleted.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import logging
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fxadapt.errors import DataError

__all__ = ["Cutout", "DATASETS", "DataBundle", "TensorImageDataset", "load_data", "make_loaders"]

logger = logging.getLogger(__name__)

DATASETS = ("cifar10", "digits", "imagefolder", "tinyimagenet")

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")

# A split with more unreadable files than this fraction is rejected as damaged.
MAX_UNREADABLE_FRACTION = 0.01

# Bump when the decoded content changes for the same files, so old cache files are ignored.
_CACHE_VERSION = 1

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0

_LAYOUT_HINTS = {
    "cifar10": (
        "a folder that holds train/<class>/ and test/<class>/ image folders, "
        "or torchvision's CIFAR-10 batch files"
    ),
    "imagefolder": "a folder that holds train/<class>/ and test/<class>/ (or val/<class>/)",
    "tinyimagenet": "the tiny-imagenet-200 folder, which holds train/, val/ and wnids.txt",
}

_CIFAR10_BATCH_FOLDER = "cifar-10-batches-py"

# Exceptions that PIL raises for a missing, damaged or unsupported file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class TensorImageDataset(Dataset):
    """Image data set held in memory as one uint8 tensor.

    ``train`` and ``train_plain`` of a :class:`DataBundle` share ``images`` and ``labels``
    and differ only in ``transform``.

    Args:
        images: uint8 tensor of shape (N, C, H, W).
        labels: int64 tensor of shape (N,).
        transform: callable that turns one uint8 image of shape (C, H, W) into the float
            tensor that the model takes as input.

    Raises:
        ValueError: when the tensors have the wrong dtype or shape.
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
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


@dataclass
class DataBundle:
    """Train and test splits of one data set, with what a model needs to know about them.

    Attributes:
        name: data set name, one of :data:`DATASETS`.
        train: train split, augmented unless ``load_data`` got ``augment=False``.
        test: test split, never augmented.
        num_classes: number of classes.
        input_shape: shape (C, H, W) of one image.
        classes: class names, indexed by label.
        train_plain: the samples of ``train`` without augmentation.
        mean: per-channel mean used to normalise the images, in [0, 1] units.
        std: per-channel standard deviation used to normalise the images.
        crop_padding: padding in pixels of the random crop that augments ``train``.
        flip: whether the augmentation of ``train`` flips images horizontally at random.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    classes: list[str]
    train_plain: Dataset
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    crop_padding: int = 0
    flip: bool = False


@dataclass
class _DecodedData:
    """Both splits of a data set as uint8 tensors, before limits and transforms."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool


@dataclass
class _FileList:
    """Image files of one split with their labels.

    ``root`` names the split in messages and in the cache key. ``classes`` are the class
    names that the labels index. ``folders`` are the directories and annotation files whose
    modification times the cache key includes.
    """

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    folders: list[Path]


def load_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
    augment: bool = True,
    cutout: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> DataBundle:
    """Load a data set into memory and wrap its splits as data sets.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: folder of the data set. ``digits`` needs none and ignores it.
        train_limit: number of train samples to keep, chosen class-balanced: each class
            gets ``train_limit // num_classes`` and the first classes get one more each
            until the remainder is used up. A limit larger than the split keeps it whole.
        test_limit: the same for the test split.
        seed: seed of the choice of limited subsets, from 0 to 2**32 - 1.
        augment: whether ``train`` applies the data set's augmentation.
        cutout: side in pixels of the square that Cutout blanks in every augmented training
            image (after normalisation, so the square is the data set's mean); 0 for none.
        cache_dir: folder for decoded image trees. Defaults to ``$FXADAPT_CACHE`` or
            ``~/.cache/fxadapt``.

    Returns:
        The splits, class names and input shape of the data set.

    Raises:
        DataError: when the name is unknown, the folder is missing or in the wrong layout,
            a class folder contains no images, a split is empty, more than 1% of a split's
            files cannot be decoded, or a limit is smaller than the number of classes.
        ValueError: when ``seed`` is out of range.
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    _check_seed(seed)
    _check_limit_type(train_limit, "--train-limit")
    _check_limit_type(test_limit, "--test-limit")

    if name == "digits":
        if data_dir is not None:
            logger.warning("ignoring data_dir %s because digits is embedded in fxadapt", data_dir)
        decoded = _load_digits()
    else:
        root = _resolve_data_dir(name, data_dir)
        cache = _resolve_cache_dir(cache_dir)
        if name == "cifar10":
            decoded = _load_cifar10(root, cache)
        elif name == "imagefolder":
            decoded = _load_imagefolder(root, cache)
        else:
            decoded = _load_tinyimagenet(root, cache)

    if cutout < 0:
        raise DataError(f"invalid --cutout {cutout}: give a side in pixels, 0 for none")
    return _assemble_bundle(
        decoded,
        augment=augment,
        cutout=cutout,
        train_limit=train_limit,
        test_limit=test_limit,
        seed=seed,
    )


def make_loaders(
    bundle: DataBundle,
    batch_size: int,
    *,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Build the train and test loaders of a data bundle.

    The train loader shuffles with a ``torch.Generator`` seeded by ``seed``, so a rerun
    visits the samples in the same order, epoch after epoch. With worker processes the
    augmentation is seeded from that generator too. Without workers it draws from
    torch's global random number generator, which the caller seeds. The test loader keeps
    the order of the split and never drops the last batch.

    Args:
        bundle: data set from :func:`load_data`.
        batch_size: samples per batch.
        seed: seed of the train order.
        num_workers: worker processes per loader; 0 loads in the calling process.
        pin_memory: whether batches go to page-locked memory, for faster copies to a GPU.
        drop_last: whether the train loader drops the last, incomplete batch.

    Returns:
        The train loader and the test loader.

    Raises:
        ValueError: when ``batch_size`` is below 1 or ``num_workers`` below 0.
        DataError: when ``drop_last`` would leave the train loader without a batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be 0 or more, got {num_workers}")
    if drop_last and len(bundle.train) < batch_size:
        raise DataError(
            f"the train split of {bundle.name} has {len(bundle.train)} samples, fewer than "
            f"one batch of {batch_size}: lower the batch size or turn off drop_last"
        )

    generator = torch.Generator()
    generator.manual_seed(seed)
    train_loader = DataLoader(
        bundle.train,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )
    test_loader = DataLoader(
        bundle.test,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
    return train_loader, test_loader


# Argument checks


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be between 0 and 2**32 - 1, got {seed}")


def _check_limit_type(limit: int | None, option: str) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DataError(f"invalid {option} {limit!r}: pass a positive number of samples")


def _resolve_data_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    hint = _LAYOUT_HINTS[name]
    if data_dir is None:
        raise DataError(f"data set {name} needs a data directory: pass --data-dir with {hint}")
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data directory {root} not found: pass --data-dir with {hint}")
    if not root.is_dir():
        raise DataError(f"data directory {root} is not a folder: pass --data-dir with {hint}")
    return root.resolve()


def _resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_environment = os.environ.get("FXADAPT_CACHE")
    if from_environment:
        return Path(from_environment).expanduser()
    return Path.home() / ".cache" / "fxadapt"


# Digits


def _load_digits() -> _DecodedData:
    resource = importlib.resources.files("fxadapt") / "data" / "digits.csv.gz"
    with resource.open("rb") as compressed, gzip.open(compressed, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)
    pixels = torch.from_numpy(table[:, :64]).to(torch.float32).reshape(-1, 1, 8, 8) / 16
    labels = torch.from_numpy(table[:, 64])

    upsampled = torch.nn.functional.interpolate(
        pixels, size=(32, 32), mode="bilinear", align_corners=False
    )
    grey = (upsampled.clamp(0, 1) * 255).round().to(torch.uint8)
    images = grey.expand(-1, 3, -1, -1).contiguous()

    train_index, test_index = _stratified_split(labels, _DIGITS_TEST_FRACTION, _DIGITS_SPLIT_SEED)
    train_images = images[train_index]
    mean, std = _channel_mean_std(train_images)
    return _DecodedData(
        name="digits",
        train_images=train_images,
        train_labels=labels[train_index],
        test_images=images[test_index],
        test_labels=labels[test_index],
        classes=[str(digit) for digit in range(10)],
        mean=mean,
        std=std,
        crop_padding=2,
        flip=False,
    )


def _stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices class by class and return the sorted train and test indices."""
    # NumPy freezes the stream of RandomState, so the split is the same on every machine
    # and every NumPy version.
    random_state = np.random.RandomState(seed)
    train_parts, test_parts = [], []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels.numpy() == label)
        shuffled = random_state.permutation(members)
        test_count = round(len(members) * test_fraction)
        test_parts.append(shuffled[:test_count])
        train_parts.append(shuffled[test_count:])
    train_index = torch.from_numpy(np.sort(np.concatenate(train_parts)))
    test_index = torch.from_numpy(np.sort(np.concatenate(test_parts)))
    return train_index, test_index


# CIFAR-10


class _Cifar10FlatFolder(torchvision.datasets.CIFAR10):
    """CIFAR-10 read from batch files that lie directly in ``root``.

    torchvision joins ``root`` and the class attribute ``base_folder`` to find the batch
    files, so an empty ``base_folder`` accepts a folder of any name.
    """

    base_folder = ""


def _load_cifar10(root: Path, cache_dir: Path) -> _DecodedData:
    if (root / "train").is_dir():
        train_files, test_files, classes = _list_image_tree(root, "cifar10")
        if len(classes) != 10:
            logger.warning(
                "cifar10 expects 10 class folders in %s but found %d. "
                "Use imagefolder for other trees.",
                root / "train",
                len(classes),
            )
        train_images, train_labels = _decode_split(train_files, (32, 32), cache_dir, "cifar10")
        test_images, test_labels = _decode_split(test_files, (32, 32), cache_dir, "cifar10")
    elif (root / _CIFAR10_BATCH_FOLDER).is_dir() or (root / "data_batch_1").is_file():
        train_images, train_labels, test_images, test_labels, classes = _read_cifar10_batches(root)
    else:
        raise DataError(
            f"no train/ folder, {_CIFAR10_BATCH_FOLDER}/ folder or data_batch_1 file in "
            f"{root}: pass --data-dir with {_LAYOUT_HINTS['cifar10']}"
        )
    return _DecodedData(
        name="cifar10",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


def _read_cifar10_batches(
    root: Path,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Read torchvision's CIFAR-10 batch files with ``torchvision.datasets.CIFAR10``.

    torchvision checks the MD5 sum of every file and unpickles them, so point it only at
    files from a trusted source.
    """
    if (root / _CIFAR10_BATCH_FOLDER).is_dir():
        dataset_class, batch_folder = torchvision.datasets.CIFAR10, root / _CIFAR10_BATCH_FOLDER
    else:
        dataset_class, batch_folder = _Cifar10FlatFolder, root
    try:
        train = dataset_class(str(root), train=True, download=False)
        test = dataset_class(str(root), train=False, download=False)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(
            f"CIFAR-10 batch files in {batch_folder} are missing or damaged ({err}): "
            f"unpack cifar-10-python.tar.gz again"
        ) from err

    train_images = torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous()
    test_images = torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous()
    train_labels = torch.tensor(train.targets, dtype=torch.int64)
    test_labels = torch.tensor(test.targets, dtype=torch.int64)
    logger.info(
        "read %d train and %d test images from the CIFAR-10 batch files in %s",
        len(train_images),
        len(test_images),
        batch_folder,
    )
    return train_images, train_labels, test_images, test_labels, list(train.classes)


# Image-folder trees


def _load_imagefolder(root: Path, cache_dir: Path) -> _DecodedData:
    train_files, test_files, classes = _list_image_tree(root, "imagefolder")
    train_images, train_labels = _decode_split(train_files, None, cache_dir, "imagefolder")
    image_size = (train_images.shape[2], train_images.shape[3])
    test_images, test_labels = _decode_split(test_files, image_size, cache_dir, "imagefolder")
    mean, std = _channel_mean_std(train_images)
    return _DecodedData(
        name="imagefolder",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=classes,
        mean=mean,
        std=std,
        crop_padding=max(1, image_size[0] // 8),
        flip=True,
    )


def _list_image_tree(root: Path, name: str) -> tuple[_FileList, _FileList, list[str]]:
    """List the train split and the test (or val) split of an image-folder tree."""
    hint = _LAYOUT_HINTS[name]
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"no train/ folder in {root}: pass --data-dir with {hint}")
    test_dir = root / "test"
    if not test_dir.is_dir():
        test_dir = root / "val"
    if not test_dir.is_dir():
        raise DataError(f"no test/ or val/ folder in {root}: pass --data-dir with {hint}")

    classes = _list_class_folders(train_dir)
    train_files = _list_class_files(train_dir, classes, classes, train_dir)
    test_folder_names = _list_class_folders(test_dir)
    test_files = _list_class_files(test_dir, test_folder_names, classes, train_dir)
    missing = sorted(set(classes) - set(test_folder_names))
    if missing:
        logger.warning(
            "%s has no folder for %d of the %d classes, first: %s",
            test_dir,
            len(missing),
            len(classes),
            missing[0],
        )
    return train_files, test_files, classes


def _list_class_folders(split_dir: Path) -> list[str]:
    names = sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not names:
        raise DataError(
            f"no class folders in {split_dir}: put the images of each class in their own "
            f"folder, {split_dir.name}/<class>/"
        )
    return names


def _list_class_files(
    split_dir: Path, folder_names: list[str], classes: list[str], class_source: Path
) -> _FileList:
    """List the images under each class folder of a split, recursively and in sorted order.

    ``classes`` fixes the label of each folder name, and ``class_source`` is the folder or
    file they come from. A folder outside ``classes`` and a folder without images raise
    DataError.
    """
    class_to_label = {name: label for label, name in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    folders = [split_dir]
    for folder_name in folder_names:
        class_dir = split_dir / folder_name
        if folder_name not in class_to_label:
            raise DataError(
                f"class folder {class_dir} matches no class in {class_source}: rename or remove it"
            )
        files, subfolders = _find_image_files(class_dir)
        if not files:
            raise DataError(
                f"class folder {class_dir} contains no images ({', '.join(IMAGE_EXTENSIONS)}): "
                f"add images or remove the folder"
            )
        paths.extend(files)
        labels.extend([class_to_label[folder_name]] * len(files))
        folders.append(class_dir)
        folders.extend(subfolders)
    return _FileList(
        root=split_dir, paths=paths, labels=labels, classes=list(classes), folders=folders
    )


def _find_image_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Return the image files under ``folder`` and its subfolders, skipping hidden ones."""
    files: list[Path] = []
    subfolders: list[Path] = []
    for directory, dir_names, file_names in os.walk(folder, followlinks=True):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith("."))
        if directory != str(folder):
            subfolders.append(Path(directory))
        for file_name in sorted(file_names):
            if not file_name.startswith(".") and file_name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(directory, file_name))
    return files, subfolders


# Tiny ImageNet


def _load_tinyimagenet(root: Path, cache_dir: Path) -> _DecodedData:
    hint = _LAYOUT_HINTS["tinyimagenet"]
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"no train/ folder in {root}: pass --data-dir with {hint}")
    classes, class_source = _read_tinyimagenet_classes(root, train_dir)
    train_folder_names = _list_class_folders(train_dir)
    train_files = _list_class_files(train_dir, train_folder_names, classes, class_source)
    val_files = _list_tinyimagenet_val(root, classes)

    train_images, train_labels = _decode_split(train_files, (64, 64), cache_dir, "tinyimagenet")
    val_images, val_labels = _decode_split(val_files, (64, 64), cache_dir, "tinyimagenet")
    return _DecodedData(
        name="tinyimagenet",
        train_images=train_images,
        train_labels=train_labels,
        test_images=val_images,
        test_labels=val_labels,
        classes=classes,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        crop_padding=8,
        flip=True,
    )


def _read_tinyimagenet_classes(root: Path, train_dir: Path) -> tuple[list[str], Path]:
    """Return the class wnids and the file or folder that lists them.

    The wnids come in the order of ``wnids.txt``, or as the sorted train folder names when
    that file is absent.
    """
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        return _list_class_folders(train_dir), train_dir
    wnids = [line.strip() for line in wnids_file.read_text().splitlines() if line.strip()]
    if not wnids:
        raise DataError(f"{wnids_file} lists no classes: write one wnid per line or delete it")
    for wnid in wnids:
        if not (train_dir / wnid).is_dir():
            raise DataError(
                f"class folder {train_dir / wnid} not found, but {wnids_file} lists {wnid}: "
                f"add the folder or remove the wnid"
            )
    return wnids, wnids_file


def _list_tinyimagenet_val(root: Path, classes: list[str]) -> _FileList:
    """List the validation images and their labels from ``val/val_annotations.txt``.

    Each line of that file is tab-separated: file name, wnid, then four box coordinates.
    """
    val_dir = root / "val"
    images_dir = val_dir / "images"
    annotations = val_dir / "val_annotations.txt"
    expected = "val/images/ with val/val_annotations.txt (file name, wnid, box; tab-separated)"
    if not images_dir.is_dir():
        raise DataError(f"no val/images/ folder in {root}: tinyimagenet expects {expected}")
    if not annotations.is_file():
        raise DataError(f"no val/val_annotations.txt in {root}: tinyimagenet expects {expected}")

    class_to_label = {wnid: label for label, wnid in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataError(
                f"line {line_number} of {annotations} has no tab between file name and wnid: "
                f"write 'file name<TAB>wnid<TAB>box' on every line"
            )
        file_name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_to_label:
            raise DataError(
                f"line {line_number} of {annotations} names wnid {wnid}, which has no folder "
                f"in {root / 'train'}: fix the line or add the class"
            )
        paths.append(images_dir / file_name)
        labels.append(class_to_label[wnid])
    if not paths:
        raise DataError(f"{annotations} lists no images: tinyimagenet expects {expected}")

    listed = {path.name for path in paths}
    unlisted = [
        name
        for name in os.listdir(images_dir)
        if name.lower().endswith(IMAGE_EXTENSIONS) and name not in listed
    ]
    if unlisted:
        logger.warning(
            "ignoring %d images in %s that %s does not label, first: %s",
            len(unlisted),
            images_dir,
            annotations.name,
            sorted(unlisted)[0],
        )
    return _FileList(
        root=val_dir,
        paths=paths,
        labels=labels,
        classes=list(classes),
        folders=[images_dir, annotations],
    )


# Decoding and the cache


def _decode_split(
    files: _FileList, image_size: tuple[int, int] | None, cache_dir: Path, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the images of a split, or read them from the cache when it has them.

    Args:
        files: image files and labels of the split.
        image_size: (height, width) that every image is resized to; None takes the size of
            the first image that decodes.
        cache_dir: folder of the cache files.
        name: data set name, part of the cache file name.

    Returns:
        The uint8 images of shape (N, 3, H, W) and their int64 labels.
    """
    key = _cache_key(files, image_size)
    cache_path = cache_dir / f"{name}-{files.root.name}-{key[:24]}.pt"
    cached = _read_cache(cache_path)
    if cached is not None:
        _report_unreadable([Path(path) for path in cached["skipped"]], len(files.paths), files.root)
        logger.info(
            "read %d decoded images of %s from %s", len(cached["images"]), files.root, cache_path
        )
        return cached["images"], cached["labels"]

    start = time.perf_counter()
    images, decoded_indices, unreadable = _decode_files(files.paths, image_size)
    _report_unreadable(unreadable, len(files.paths), files.root)
    labels = torch.tensor(files.labels, dtype=torch.int64)[decoded_indices]
    logger.info(
        "decoded %d images of %s in %.1f s", len(images), files.root, time.perf_counter() - start
    )

    _write_cache(
        cache_path,
        {
            "version": _CACHE_VERSION,
            "images": images,
            "labels": labels,
            "skipped": [str(path) for path in unreadable],
        },
    )
    return images, labels


def _decode_files(
    paths: Sequence[Path], image_size: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, list[Path]]:
    """Decode image files into one uint8 tensor, skipping the ones that fail.

    Returns:
        The images of shape (N, 3, H, W), the indices into ``paths`` of the files that
        decoded, and the paths of the files that did not.
    """
    # Measured on 2 shared CPU cores with the 60,000 JPEG files of CIFAR-10, this loop takes
    # 3 to 5 s. Thread pools and a 2-process pool were no faster, so the loop stays serial.
    pixels: np.ndarray | None = None
    decoded_indices: list[int] = []
    unreadable: list[Path] = []
    for index, path in enumerate(paths):
        try:
            image = _decode_file(path, image_size)
        except _DECODE_ERRORS as err:
            logger.debug("cannot decode %s: %s", path, err)
            unreadable.append(path)
            continue
        if pixels is None:
            image_size = (image.shape[0], image.shape[1])
            pixels = np.empty((len(paths), *image_size, 3), dtype=np.uint8)
        pixels[len(decoded_indices)] = image
        decoded_indices.append(index)

    if pixels is None:
        images = torch.empty((0, 3, *(image_size or (0, 0))), dtype=torch.uint8)
    else:
        images = torch.from_numpy(pixels[: len(decoded_indices)]).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(decoded_indices, dtype=torch.int64), unreadable


def _decode_file(path: Path, image_size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image file into a uint8 RGB array of shape (H, W, 3).

    Args:
        path: image file.
        image_size: (height, width) to resize to with bilinear interpolation; None keeps
            the size of the file.
    """
    # NOTE: PIL decodes truncated files only when some other code has set
    # PIL.ImageFile.LOAD_TRUNCATED_IMAGES; such files then pass as readable.
    with Image.open(path) as opened:
        if opened.mode.startswith("I;16"):
            # 16-bit greyscale: keep the high byte, which convert("RGB") would clip instead.
            high_bytes = (np.asarray(opened).astype(np.uint16) >> 8).astype(np.uint8)
            image = Image.fromarray(high_bytes).convert("RGB")
        else:
            image = opened.convert("RGB")
    if image_size is not None and image.size != (image_size[1], image_size[0]):
        image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _report_unreadable(unreadable: list[Path], total: int, root: Path) -> None:
    """Warn about skipped files, or raise DataError when they exceed the allowed fraction."""
    if not unreadable:
        return
    if len(unreadable) > MAX_UNREADABLE_FRACTION * total:
        raise DataError(
            f"{len(unreadable)} of {total} image files in {root} cannot be decoded "
            f"(more than {MAX_UNREADABLE_FRACTION:.0%}), first: {unreadable[0]}: "
            f"replace or remove the damaged files"
        )
    logger.warning(
        "skipped %d of %d image files in %s that cannot be decoded, first: %s",
        len(unreadable),
        total,
        root,
        unreadable[0],
    )


def _cache_key(files: _FileList, image_size: tuple[int, int] | None) -> str:
    newest_mtime_ns = 0
    for path in [*files.paths, *files.folders]:
        try:
            newest_mtime_ns = max(newest_mtime_ns, os.stat(path).st_mtime_ns)
        except OSError:
            # A missing file is counted as unreadable when it is decoded.
            continue
    fields = {
        "version": _CACHE_VERSION,
        "root": str(files.root.resolve()),
        "classes": files.classes,
        "file_count": len(files.paths),
        "newest_mtime_ns": newest_mtime_ns,
        "image_size": list(image_size) if image_size else None,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        logger.warning("ignoring unreadable cache file %s and decoding again: %s", path, err)
        return None
    if not isinstance(content, dict) or content.get("version") != _CACHE_VERSION:
        logger.warning("ignoring cache file %s of another format and decoding again", path)
        return None
    return content


def _write_cache(path: Path, content: dict) -> None:
    """Write a cache file atomically: to a temporary file first, then renamed over ``path``."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(content, stream)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as err:
        logger.warning(
            "failed to write cache file %s, so the next load decodes again: %s", path, err
        )


# Bundles, subsets and transforms


def _assemble_bundle(
    decoded: _DecodedData,
    *,
    augment: bool,
    cutout: int,
    train_limit: int | None,
    test_limit: int | None,
    seed: int,
) -> DataBundle:
    num_classes = len(decoded.classes)
    train_index = _balanced_subset(
        decoded.train_labels, num_classes, train_limit, seed, "--train-limit"
    )
    test_index = _balanced_subset(
        decoded.test_labels, num_classes, test_limit, seed, "--test-limit"
    )
    train_images, train_labels = _select(decoded.train_images, decoded.train_labels, train_index)
    test_images, test_labels = _select(decoded.test_images, decoded.test_labels, test_index)

    eval_transform = _eval_transform(decoded.mean, decoded.std)
    train_transform = eval_transform
    if augment:
        train_transform = _train_transform(
            train_images.shape[2:], decoded.crop_padding, decoded.flip, decoded.mean, decoded.std
        )
        if cutout:
            train_transform = v2.Compose([train_transform, Cutout(cutout)])
    channels, height, width = train_images.shape[1:]
    return DataBundle(
        name=decoded.name,
        train=TensorImageDataset(train_images, train_labels, train_transform),
        test=TensorImageDataset(test_images, test_labels, eval_transform),
        num_classes=num_classes,
        input_shape=(channels, height, width),
        classes=list(decoded.classes),
        train_plain=TensorImageDataset(train_images, train_labels, eval_transform),
        mean=tuple(decoded.mean),
        std=tuple(decoded.std),
        crop_padding=decoded.crop_padding if augment else 0,
        flip=decoded.flip and augment,
    )


def _select(
    images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if index is None:
        return images, labels
    return images[index], labels[index]


def _balanced_subset(
    labels: torch.Tensor, num_classes: int, limit: int | None, seed: int, option: str
) -> torch.Tensor | None:
    """Choose a class-balanced subset of ``limit`` samples and return its sorted indices.

    Each class gets ``limit // num_classes`` samples and the first classes one more until
    the remainder is used up. A class with too few samples gives its share to the classes
    after it, then to the first ones again. Returns None when the limit keeps every sample.
    """
    if limit is None:
        return None
    if limit < num_classes:
        raise DataError(
            f"{option} {limit} is smaller than the {num_classes} classes: pass at least "
            f"{num_classes} so that every class keeps a sample"
        )
    if limit >= len(labels):
        return None

    label_array = labels.numpy()
    members = [np.flatnonzero(label_array == label) for label in range(num_classes)]
    quotas = _balanced_quotas([len(indices) for indices in members], limit)
    random_state = np.random.RandomState(seed)
    chosen = [
        random_state.permutation(indices)[:quota]
        for indices, quota in zip(members, quotas, strict=True)
    ]
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


def _balanced_quotas(counts: list[int], limit: int) -> list[int]:
    """Share ``limit`` among classes as evenly as their sample counts allow."""
    quotas = [0] * len(counts)
    remaining = min(limit, sum(counts))
    open_classes = [label for label, count in enumerate(counts) if count > 0]
    while remaining > 0:
        share, extra = divmod(remaining, len(open_classes))
        for position, label in enumerate(open_classes):
            target = share + (1 if position < extra else 0)
            added = min(target, counts[label] - quotas[label])
            quotas[label] += added
            remaining -= added
        open_classes = [label for label in open_classes if quotas[label] < counts[label]]
    return quotas


def _channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the per-channel mean and standard deviation of uint8 images, in [0, 1] units."""
    channels = images.shape[1]
    pixel_sum = torch.zeros(channels, dtype=torch.float64)
    square_sum = torch.zeros(channels, dtype=torch.float64)
    # Chunks of about 4 million values keep the float64 copy near 32 MB.
    chunk = max(1, 2**22 // max(1, images[0].numel()))
    for start in range(0, len(images), chunk):
        values = images[start : start + chunk].to(torch.float64) / 255
        pixel_sum += values.sum(dim=(0, 2, 3))
        square_sum += values.square().sum(dim=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = pixel_sum / count
    std = (square_sum / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class Cutout:
    """Sets one square of a normalised image to zero, centred anywhere in the image.

    The square may reach past the border, so less of it is blanked near the edges, as in
    DeVries and Taylor (2017).

    Args:
        size: side of the square in pixels.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        row = int(torch.randint(height, ()))
        column = int(torch.randint(width, ()))
        half = self.size // 2
        image = image.clone()
        image[..., max(row - half, 0) : row + half, max(column - half, 0) : column + half] = 0
        return image


def _eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def _train_transform(
    size: Sequence[int], padding: int, flip: bool, mean: Sequence[float], std: Sequence[float]
) -> v2.Compose:
    steps: list[Callable] = [v2.RandomCrop(list(size), padding=padding)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.extend([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return v2.Compose(steps)
