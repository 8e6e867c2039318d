"""Exceptions that fxadapt raises for problems a user can fix."""

import math

__all__ = [
    "FxadaptError",
    "ModelLoadError",
    "TraceError",
    "DataError",
    "ExportError",
    "NonFiniteLossError",
]


class FxadaptError(Exception):
    """Base class of the errors whose message tells the user what to change.

    The CLI prints the message of such an error as one line and exits with status 2.
    """


class ModelLoadError(FxadaptError):
    """The model specification names a file, module or class that cannot be loaded."""


class TraceError(FxadaptError):
    """torch.fx cannot trace the model, or the traced graph has nothing to adapt."""


class DataError(FxadaptError):
    """The data set is missing, in the wrong layout, or does not fit the model."""


class ExportError(FxadaptError):
    """An exported file does not reproduce the derived module."""


class NonFiniteLossError(FxadaptError):
    """The training loss became NaN or infinite.

    Attributes:
        loss: this process's loss at that step, which is finite when another process of a
            distributed run saw the bad value.
        epoch: the epoch, from 1.
        step: the step within the epoch, from 1.
    """

    def __init__(self, loss: float, epoch: int, step: int):
        value = "another process's loss" if math.isfinite(loss) else f"the loss ({loss})"
        super().__init__(
            f"{value} became NaN or infinite at epoch {epoch}, step {step}: lower --lr or "
            "--arch-lr and start the run again with --overwrite"
        )
        self.loss = loss
        self.epoch = epoch
        self.step = step
