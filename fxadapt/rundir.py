"""The run directory: configuration, metrics, checkpoints, edge table, exports, diagrams, report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fxadapt.errors import FxadaptError

__all__ = ["RunDir"]

logger = logging.getLogger(__name__)


def _file_mode() -> int:
    """Returns the mode that a newly created file gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


class RunDir:
    """One run's folder; every file is written whole or not at all.

    Args:
        path: the folder.
        overwrite: empty a folder that already holds files. Without it such a folder is
            rejected, so that no earlier run is lost.
    """

    CONFIG = "config.json"
    METRICS = "metrics.jsonl"
    CHECKPOINT = "checkpoint.pt"
    EDGES = "edges.json"
    DERIVED = "derived.pt"
    REPORT_JSON = "report.json"
    REPORT_MD = "report.md"
    DIAGRAMS = "diagrams"

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False, create: bool = True):
        self.path = Path(path)
        if not create:
            if not (self.path / self.CONFIG).is_file():
                raise FxadaptError(
                    f"{self.path} is not a run directory (no {self.CONFIG}): pass the --out "
                    "folder of a finished `fxadapt train`"
                )
            return
        self.check_free(self.path, overwrite=overwrite)
        if self.path.is_dir() and any(self.path.iterdir()):
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check_free(path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Raises FxadaptError when a new run may not be written to ``path``."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise FxadaptError(f"{path} exists and is not a folder: choose another --out")
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise FxadaptError(
                f"run directory {path} already holds files: pass --resume {path} to continue "
                "its run, --overwrite to replace them, or choose another --out"
            )

    def file(self, name: str) -> Path:
        """Returns the path of ``name`` inside the run directory."""
        return self.path / name

    @property
    def diagrams(self) -> Path:
        """Returns the diagrams folder, created on first use."""
        folder = self.path / self.DIAGRAMS
        folder.mkdir(exist_ok=True)
        return folder

    def write_json(self, name: str, data) -> Path:
        """Writes ``data`` as indented JSON, atomically."""
        return self.write_text(name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str):
        """Returns the data of a JSON file of the run."""
        return json.loads(self.file(name).read_text())

    def write_text(self, name: str, text: str) -> Path:
        """Writes ``text`` to ``name`` through a temporary file and a rename."""
        target = self.file(name)
        handle, temporary = tempfile.mkstemp(dir=self.path, prefix=f".{name}.")
        # mkstemp creates the file readable by its owner only; run files are for sharing.
        os.chmod(temporary, _FILE_MODE)
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, target)
        return target

    def append_metrics(self, record: dict) -> None:
        """Appends one JSON line to ``metrics.jsonl``."""
        with open(self.file(self.METRICS), "a") as stream:
            stream.write(json.dumps(record) + "\n")

    def save_tensors(self, name: str, data: dict) -> Path:
        """Writes plain data and tensors with ``torch.save``, atomically."""
        target = self.file(name)
        handle, temporary = tempfile.mkstemp(dir=self.path, prefix=f".{name}.")
        # mkstemp creates the file readable by its owner only; run files are for sharing.
        os.chmod(temporary, _FILE_MODE)
        os.close(handle)
        try:
            torch.save(data, temporary)
            # The rename is atomic, but only a synced file survives a machine crash whole.
            with open(temporary, "rb") as stream:
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return target

    def load_tensors(self, name: str) -> dict:
        """Reads a file that ``save_tensors`` wrote, with ``weights_only=True``."""
        return torch.load(self.file(name), map_location="cpu", weights_only=True)
