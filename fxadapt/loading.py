"""Loading a model from a ``path/to/file.py:Class`` or ``package.module:Class`` specification."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

from torch import nn

from fxadapt.errors import ModelLoadError

__all__ = ["load_model_class", "build_model", "parse_model_args"]


def load_model_class(spec: str) -> type[nn.Module]:
    """Returns the class named by ``spec``.

    Args:
        spec: ``path/to/file.py:Class`` or ``package.module:Class``.

    Raises:
        ModelLoadError: when the file, module or class cannot be found or imported.
    """
    location, separator, class_name = spec.rpartition(":")
    if not separator or not location or not class_name:
        raise ModelLoadError(
            f"invalid model {spec!r}: write path/to/file.py:Class or package.module:Class"
        )
    module = _import_file(location) if location.endswith(".py") else _import_module(location)
    model_class = getattr(module, class_name, None)
    if model_class is None:
        classes = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isclass(value)
            and issubclass(value, nn.Module)
            and not name.startswith("_")
            and value.__module__ == module.__name__
        )
        found = f"; it defines {', '.join(classes)}" if classes else ""
        raise ModelLoadError(f"class {class_name} not found in {location}{found}")
    if not (inspect.isclass(model_class) and issubclass(model_class, nn.Module)):
        raise ModelLoadError(f"{spec} is not a torch.nn.Module class")
    return model_class


def build_model(spec: str, kwargs: dict | None = None) -> nn.Module:
    """Loads the class named by ``spec`` and calls it with ``kwargs``.

    Raises:
        ModelLoadError: when the class cannot be loaded or its constructor raises.
    """
    model_class = load_model_class(spec)
    kwargs = dict(kwargs or {})
    try:
        return model_class(**kwargs)
    except Exception as err:
        arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
        raise ModelLoadError(
            f"{model_class.__name__}({arguments}) raised {type(err).__name__}: {err}; "
            "check the --model-arg values"
        ) from err


def parse_model_args(pairs: list[str]) -> dict:
    """Parses ``key=value`` strings; values are Python literals, or strings otherwise.

    Raises:
        ModelLoadError: for a pair without ``=``.
    """
    kwargs = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or not key.isidentifier():
            raise ModelLoadError(f"invalid model argument {pair!r}: write NAME=VALUE")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def _import_file(location: str):
    path = Path(location).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"model file {location} not found: check the path before the ':'")
    # A name of our own keeps two model files with the same stem apart in sys.modules.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    module_name = f"fxadapt_user_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ModelLoadError(f"importing {location} failed: {type(err).__name__}: {err}") from err
    return module


def _import_module(location: str):
    try:
        return importlib.import_module(location)
    except ModuleNotFoundError as err:
        raise ModelLoadError(
            f"module {location} not found ({err}); give a file path ending in .py or install "
            "the package"
        ) from err
    except Exception as err:
        raise ModelLoadError(f"importing {location} failed: {type(err).__name__}: {err}") from err
