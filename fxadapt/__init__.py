"""fxadapt: adapt the architecture of a PyTorch network while it trains."""

__version__ = "0.1.0"
