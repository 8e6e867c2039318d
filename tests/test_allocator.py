"""glibc's malloc keeps freed memory in the process once ``keep_freed_memory`` has run."""

import platform
import subprocess
import sys

import pytest

import fxadapt.cli
from fxadapt.cli import main

GLIBC = platform.libc_ver()[0] == "glibc"

# Prints the growth of resident memory, in MiB, that freeing a 16 MiB tensor leaves behind.
_PROBE = """
import os, sys, torch
from fxadapt.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def resident():
    pages = int(open("/proc/self/statm").read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident()
tensor = torch.ones(4 * 2**20)
del tensor
print(applied, resident() - before)
"""


def _resident_growth(mode: str) -> tuple[str, float]:
    finished = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    applied, growth = finished.stdout.split()
    return applied, float(growth)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_freed_tensor_stays_resident():
    applied, growth = _resident_growth("keep")

    assert applied == "True"
    assert growth >= 12


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_default_malloc_returns_freed_tensor():
    applied, growth = _resident_growth("default")

    assert applied == "None"
    assert growth < 4


@pytest.mark.parametrize(("flag", "calls"), [(None, 1), ("--no-keep-freed-memory", 0)])
def test_train_flag_sets_malloc(flag, calls, monkeypatch, tmp_path, capsys):
    recorded = []
    monkeypatch.setattr(fxadapt.cli, "keep_freed_memory", lambda: recorded.append(True))
    arguments = ["train", f"{tmp_path / 'missing.py'}:Net", "--out", str(tmp_path / "run")]

    status = main(arguments + ([flag] if flag else []))

    assert status == 2
    assert "missing.py" in capsys.readouterr().err
    assert len(recorded) == calls
