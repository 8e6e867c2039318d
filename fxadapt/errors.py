"""Exceptions that fxadapt raises for problems a user can fix."""

__all__ = ["FxadaptError", "ModelLoadError", "TraceError", "DataError", "ExportError"]


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
