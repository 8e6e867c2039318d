"""fxadapt: adapt the architecture of a PyTorch network while it trains.

The Python API, for people with their own training loop::

    wrapped = fxadapt.wrap(model, example_input)          # mixed edges, theta at (0, 0, 1)
    fused = fxadapt.fuse(wrapped)                         # the same weights, faster to train
    fxadapt.arch_parameters(wrapped)                      # theta
    fxadapt.weight_parameters(wrapped)                    # everything else
    derived = fxadapt.derive(wrapped)                     # a plain, smaller GraphModule
    fxadapt.export(derived, "model.ts", example_input)    # TorchScript, checked
"""

from fxadapt.api import (
    arch_parameters,
    derive,
    edge_table,
    fuse,
    is_wrapped,
    weight_parameters,
    wrap,
)
from fxadapt.edges import Edge, EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.export import export

__all__ = [
    "Edge",
    "EdgeTable",
    "FxadaptError",
    "arch_parameters",
    "derive",
    "edge_table",
    "export",
    "fuse",
    "is_wrapped",
    "weight_parameters",
    "wrap",
]

__version__ = "0.1.0"
