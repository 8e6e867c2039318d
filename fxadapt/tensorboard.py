"""TensorBoard logging of a run: the per-epoch metrics and the sampled theta, as scalars.

The event files go to ``RUN/tensorboard/``, and ``tensorboard --logdir RUN`` shows them.
TensorBoard is an optional extra (``pip install 'fxadapt[tensorboard]'``), imported only
when a ``TensorBoardLog`` is made.

Scalars written, with the step they are plotted over:

- ``loss/train``, ``loss/test``, ``accuracy/train``, ``accuracy/test``, ``lr/weights``,
  ``lr/theta`` (architecture stage only), ``speed/images_per_second`` and
  ``time/epoch_seconds``, over the epoch;
- ``theta/<theta group>/<option>`` for ``same`` and ``identity``, over the architecture
  step (``global_step`` of a ``ThetaLog`` sample). The theta of ``none`` is a constant 0,
  so it is not written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fxadapt.errors import FxadaptError

if TYPE_CHECKING:
    from fxadapt.trainer import EpochRecord

__all__ = ["TENSORBOARD", "TensorBoardLog"]

logger = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"
"""Folder of the event files in a run directory."""

# Tag of each per-epoch metric, keyed by its field in ``EpochRecord``.
_FIELD_TO_TAG = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_accuracy": "accuracy/train",
    "test_accuracy": "accuracy/test",
    "lr": "lr/weights",
    "arch_lr": "lr/theta",
    "images_per_second": "speed/images_per_second",
    "seconds": "time/epoch_seconds",
}


class TensorBoardLog:
    """Writes a run's per-epoch metrics and sampled theta to TensorBoard event files.

    Call ``log_epoch`` after every epoch and pass ``log_theta`` as the ``on_sample`` of a
    ``ThetaLog``, so that TensorBoard shows the same theta samples as ``theta.jsonl``. Close
    the log at the end of the run, or use it as a context manager.

    Args:
        run_dir: the run directory. The event files go to its ``tensorboard`` folder.

    Raises:
        FxadaptError: when the tensorboard package is not installed.
    """

    def __init__(self, run_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise FxadaptError(
                "--tensorboard needs the tensorboard package, which is not installed: "
                "pip install 'fxadapt[tensorboard]'"
            ) from err
        self.folder = Path(run_dir) / TENSORBOARD
        self.writer = SummaryWriter(log_dir=str(self.folder))
        logger.info("writing TensorBoard events to %s", self.folder)

    def log_epoch(self, record: EpochRecord | Mapping) -> None:
        """Writes the metrics of one epoch, from an ``EpochRecord`` or its ``to_dict()``."""
        values = record.to_dict() if hasattr(record, "to_dict") else dict(record)
        epoch = values["epoch"]
        for name, tag in _FIELD_TO_TAG.items():
            value = values.get(name)
            if value is not None:
                self.writer.add_scalar(tag, value, global_step=epoch)
        self.writer.flush()

    def log_theta(self, sample: Mapping) -> None:
        """Writes one theta sample of ``ThetaLog``: ``global_step`` and ``theta``."""
        step = sample["global_step"]
        for group, option_to_value in sample["theta"].items():
            for option, value in option_to_value.items():
                if option != "none":
                    self.writer.add_scalar(f"theta/{group}/{option}", value, global_step=step)

    def close(self) -> None:
        """Writes what is pending and closes the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
