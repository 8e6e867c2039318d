"""Random number generator states as tensors and plain data, for checkpoints.

A checkpoint is read with ``torch.load(..., weights_only=True)``, which accepts tensors,
numbers, strings, lists, tuples and dicts but no NumPy arrays. So NumPy's Mersenne Twister
key is stored as an int64 tensor and Python's ``random`` state as a tuple of ints.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(device: torch.device | None = None) -> dict:
    """Returns the states of torch's, NumPy's and Python's global generators.

    Args:
        device: the device the run trains on; for a CUDA device its generator is included.
    """
    kind, key, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "key": torch.from_numpy(key.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": tuple(internal_state), "gauss_next": gauss_next},
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Sets the global generators to a state from ``capture_rng_state``.

    Args:
        state: the captured state.
        device: the device the run trains on now. Its CUDA generator is restored only when
            the state contains one, so a CPU checkpoint leaves a GPU generator as it is.
    """
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["state"]), python_state["gauss_next"])
    )
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
