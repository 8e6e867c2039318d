"""Runs the fxadapt command line: ``python -m fxadapt`` (also under torchrun)."""

import sys

from fxadapt.cli import main

sys.exit(main())
