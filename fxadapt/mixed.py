"""The mixed edge: the module that weights an edge's options by theta."""

from __future__ import annotations

import torch
from torch import nn

from fxadapt.edges import OPTIONS

__all__ = ["MixedEdge", "THETA_INIT"]

# theta at the start of training: the wrapped network computes what the original computes.
THETA_INIT = {"same": 1.0, "identity": 0.0, "none": 0.0}


class MixedEdge(nn.Module):
    """Computes ``theta_none * 0 + theta_identity * x + theta_same * o(x)`` for one edge.

    The module receives the edge's input ``x`` and the output of its original operation
    ``o(x)``; the operation itself stays in the graph. theta are raw scalars, without a
    softmax. ``theta_none`` multiplies zero, so it never gets a gradient: it is a buffer, a
    constant 0, kept so that decisions can compare it with the other options. An option the
    edge does not admit has no theta and costs nothing in the forward.

    A new shortcut's original operation is none: it admits identity and none only, and
    starts as an exact zero.

    Args:
        options: the options the edge admits, a subset of ``("same", "identity", "none")``
            with at least two options, or ``same`` alone.
    """

    def __init__(self, options: tuple[str, ...] | list[str]):
        super().__init__()
        unknown = set(options) - set(OPTIONS)
        if unknown or not options or ("same" not in options and len(set(options)) < 2):
            raise ValueError(f"options must be two or more of {OPTIONS}, got {options}")
        self.options = tuple(option for option in OPTIONS if option in options)
        self.has_same = "same" in self.options
        if self.has_same:
            self.theta_same = nn.Parameter(torch.tensor(THETA_INIT["same"]))
        self.has_identity = "identity" in self.options
        if self.has_identity:
            self.theta_identity = nn.Parameter(torch.tensor(THETA_INIT["identity"]))
        if "none" in self.options:
            self.register_buffer("theta_none", torch.tensor(THETA_INIT["none"]))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.has_same:
            return x * self.theta_identity
        if self.has_identity:
            return torch.addcmul(out * self.theta_same, x, self.theta_identity)
        return out * self.theta_same

    def theta(self) -> dict[str, float]:
        """Returns the current theta of every admitted option."""
        return {option: float(getattr(self, f"theta_{option}").detach()) for option in self.options}

    def extra_repr(self) -> str:
        return ", ".join(f"{option}={value:.4g}" for option, value in self.theta().items())
