"""The models of the compatibility benchmark: which ones, how to build them, what input they take.

Every classification builder of ``torchvision.models`` is one row. For timm, each module of
``timm.list_modules()`` (a model family) is one row, represented by its model with the fewest
parameters. Parameters are counted on the ``meta`` device, so choosing a family's smallest model
allocates no weights. Models are built with random weights (no download) and few classes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torchvision
from torch import nn

__all__ = [
    "INPUT_SIZES",
    "LIBRARIES",
    "ModelSpec",
    "build_model",
    "choose_input_size",
    "smallest_timm_model",
    "timm_modules",
    "torchvision_specs",
]

logger = logging.getLogger(__name__)

LIBRARIES = ("torchvision", "timm")

# Square input sizes to try, smallest first; the first one a model accepts is used. 75 is the
# smallest size Inception v3 accepts, 56 and 112 are multiples of a patch size of 14.
INPUT_SIZES = (32, 56, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 320, 331, 384)

# Constructor arguments that set the input size of models with a fixed input geometry:
# timm's ``img_size``, ``image_size`` of torchvision's ViT and ``input_size`` of its MaxViT.
_SIZE_ARGUMENTS = ("img_size", "image_size", "input_size")


@dataclass
class ModelSpec:
    """One row of the benchmark.

    Attributes:
        library: ``torchvision`` or ``timm``.
        family: the torchvision builder, or the timm module the model comes from.
        name: the name the library builds the model from.
        build_kwargs: extra constructor arguments, such as the input size of a ViT.
        input_size: side of the square input images, or 0 before it is chosen.
    """

    library: str
    family: str
    name: str
    build_kwargs: dict = field(default_factory=dict)
    input_size: int = 0

    @property
    def key(self) -> str:
        """Returns the row's unique name, such as ``torchvision/resnet18`` or ``timm/resnet``."""
        return f"{self.library}/{self.family}"

    def to_dict(self) -> dict:
        """Returns the spec as plain data that a worker process can receive."""
        return asdict(self)


def torchvision_specs() -> list[ModelSpec]:
    """Returns one spec per classification builder of ``torchvision.models``."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [ModelSpec("torchvision", name, name) for name in names]


def timm_modules() -> list[str]:
    """Returns timm's model modules (families).

    Raises:
        ImportError: when timm is not installed.
    """
    import timm

    return list(timm.list_modules())


def smallest_timm_model(module: str) -> tuple[str, int]:
    """Returns the model of a timm module with the fewest parameters at 10 classes.

    Each model is built on the ``meta`` device, which allocates no memory. Models that cannot
    be built there are skipped. When none can be built, the module's first model is returned.

    Returns:
        The model name and its parameter count (-1 when no model could be counted).
    """
    import timm

    names = timm.list_models(module=module)
    if not names:
        raise ValueError(f"timm module {module!r} has no models: check timm.list_modules()")
    best_name, best_count = names[0], -1
    for name in names:
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=10)
        except Exception as err:  # noqa: BLE001 - any failure only drops one candidate
            logger.debug("cannot count the parameters of %s on meta: %s", name, err)
            continue
        count = sum(parameter.numel() for parameter in model.parameters())
        if best_count < 0 or count < best_count:
            best_name, best_count = name, count
    return best_name, best_count


def build_model(spec: ModelSpec, num_classes: int, *, device: str = "cpu") -> nn.Module:
    """Builds the model of ``spec`` with random weights, in training mode.

    Args:
        spec: the model, with its constructor arguments.
        num_classes: classes of the classifier.
        device: ``cpu``, or ``meta`` to build the structure without allocating weights.
    """
    with torch.device(device), warnings.catch_warnings():
        # Some builders warn that their default initialisation will change, which does not
        # matter for random weights.
        warnings.simplefilter("ignore")
        if spec.library == "torchvision":
            model = torchvision.models.get_model(
                spec.name, weights=None, num_classes=num_classes, **spec.build_kwargs
            )
        elif spec.library == "timm":
            import timm

            model = timm.create_model(
                spec.name, pretrained=False, num_classes=num_classes, **spec.build_kwargs
            )
        else:
            raise ValueError(f"unknown library {spec.library!r}: use one of {LIBRARIES}")
    return model.train()


def choose_input_size(
    spec: ModelSpec, num_classes: int, sizes: Iterable[int] = INPUT_SIZES
) -> ModelSpec:
    """Returns ``spec`` with the smallest input size the model accepts, and the arguments for it.

    For each size, the model is first built with an input-size argument (for models with a
    fixed geometry) and then without one. A size is accepted when a batch of two images of
    that size runs through the model in eval mode and in training mode, which can differ
    (Inception v3 runs its auxiliary head in training mode only). The trials run on the
    ``meta`` device, which checks shapes without computing. A model that reads tensor values
    while running fails every trial there, so the trials are then repeated with real weights.

    Raises:
        ValueError: when no size of ``sizes`` works.
    """
    sizes = tuple(sizes)
    for device in ("meta", "cpu"):
        for size in sizes:
            for build_kwargs in _size_arguments(size):
                candidate = ModelSpec(spec.library, spec.family, spec.name, build_kwargs, size)
                if _accepts(candidate, num_classes, device):
                    return candidate
    raise ValueError(
        f"{spec.name} accepts none of the input sizes {sizes}, with or without an input-size "
        f"argument ({', '.join(_SIZE_ARGUMENTS)})"
    )


def _size_arguments(size: int) -> list[dict]:
    variants = []
    for argument in _SIZE_ARGUMENTS:
        variants.append({argument: size})
        variants.append({argument: (size, size)})
    variants.append({})
    return variants


def _accepts(spec: ModelSpec, num_classes: int, device: str) -> bool:
    batch = torch.randn(2, 3, spec.input_size, spec.input_size, device=device)
    try:
        model = build_model(spec, num_classes, device=device)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for training in (False, True):
                model.train(training)
                model(batch)
    except Exception as err:  # noqa: BLE001 - any failure means this size does not fit
        logger.debug("%s rejects %s on %s: %s", spec.name, spec.build_kwargs, device, err)
        return False
    return True
