"""Resuming: a run killed or stopped part-way and resumed ends where an uninterrupted one does.

Each scenario runs the CLI in a subprocess and watches metrics.jsonl. Once the file has a
given number of lines, the test sends a signal: SIGKILL in the architecture stage, SIGKILL
in the network stage (after derivation), or SIGINT (Ctrl-C) inside an epoch. The same
command with --resume then finishes the run. Its decisions, metrics and derived weights are
compared with those of an uninterrupted run with the same seed.
"""

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"

ARCH_EPOCHS = 2

# ResNet8 with a high theta learning rate, so that derivation prunes edges (3 of its 6 with
# seed 3) and the resumed run must rebuild a derived graph that differs from the original.
OPTIONS = [
    "--model-arg",
    "depth=8",
    "--train-limit",
    "200",
    "--test-limit",
    "100",
    "--batch-size",
    "32",
    "--epochs",
    "3",
    "--arch-epochs",
    str(ARCH_EPOCHS),
    "--arch-lr",
    "0.6",
    "--seed",
    "3",
    "--no-draw",
]

METRICS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr", "arch_lr")
TOLERANCE = 1e-6


def _train_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fxadapt", "train", MODEL, *OPTIONS, "--out", str(out), *extra]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _decisions(out: Path) -> dict[int, str]:
    edges = json.loads((out / "edges.json").read_text())["edges"]
    return {edge["id"]: edge["decision"] for edge in edges}


def _derived_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "derived.pt", weights_only=True)["state_dict"]


@dataclass
class ResumedRun:
    """A run interrupted once and resumed to the end.

    Attributes:
        out: its run directory.
        finished_before_signal: lines in metrics.jsonl when the signal was sent.
        interrupted_status: the exit status of the interrupted process.
        checkpoint: the checkpoint the resume started from.
        resumed_at: the epoch (from 1) the resumed process started training.
        resumed_status: the exit status of the resumed process.
    """

    out: Path
    finished_before_signal: int
    interrupted_status: int
    checkpoint: dict
    resumed_at: int
    resumed_status: int


def _interrupt_and_resume(out: Path, lines: int, signal_number: int, delay: float) -> ResumedRun:
    process = subprocess.Popen(
        _train_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    metrics = out / "metrics.jsonl"
    finished = 0
    while process.poll() is None:
        finished = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
        if finished >= lines:
            time.sleep(delay)
            process.send_signal(signal_number)
            break
        time.sleep(0.01)
    interrupted_status = process.wait()
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)

    resumed = subprocess.run(
        _train_command(out, "--resume", str(out), "-v"), capture_output=True, text=True
    )
    match = re.search(r"resuming at epoch (\d+)", resumed.stderr)
    return ResumedRun(
        out=out,
        finished_before_signal=finished,
        interrupted_status=interrupted_status,
        checkpoint=checkpoint,
        resumed_at=int(match.group(1)) if match else -1,
        resumed_status=resumed.returncode,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    subprocess.run(_train_command(out), check=True, capture_output=True)
    return out


# Scenario: metrics.jsonl lines to wait for, the signal, and the wait before sending it.
# Ctrl-C is sent as soon as the first epoch's line appears: the trainer stops after the
# next batch, so the second epoch is the unfinished one however fast the machine is.
SCENARIOS = {
    "killed_in_architecture_stage": (1, signal.SIGKILL, 0.0),
    "killed_after_derivation": (2, signal.SIGKILL, 0.0),
    "ctrl_c_inside_epoch": (1, signal.SIGINT, 0.0),
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def resumed(request, tmp_path_factory) -> ResumedRun:
    lines, signal_number, delay = SCENARIOS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    return _interrupt_and_resume(out, lines, signal_number, delay)


def test_interrupted_run_stops_where_expected(resumed):
    checkpoint = resumed.checkpoint

    assert resumed.interrupted_status in (-signal.SIGKILL, 130)
    if resumed.interrupted_status == 130:
        # Ctrl-C saves the unfinished epoch at a batch boundary.
        assert checkpoint["unfinished"] is not None
        assert checkpoint["unfinished"][0]["steps"] >= 1
    else:
        assert checkpoint["unfinished"] is None
    # On a fast machine more epochs can end between the last look at metrics.jsonl and the
    # signal, so the epoch in the checkpoint shows whether derivation has happened.
    assert checkpoint["epoch"] >= resumed.finished_before_signal
    assert (checkpoint["decisions"] is not None) == (checkpoint["epoch"] >= ARCH_EPOCHS)


def test_resume_repeats_at_most_one_epoch(resumed):
    # A finished epoch is checkpointed before its metrics line is written. So the resumed
    # process never trains again an epoch that the interrupted one finished. Only the epoch in
    # progress when the signal came is trained again, or continued after Ctrl-C.
    assert resumed.resumed_status == 0
    assert resumed.resumed_at == resumed.checkpoint["epoch"] + 1
    assert resumed.resumed_at >= resumed.finished_before_signal + 1


def test_resumed_decisions_equal_uninterrupted(resumed, uninterrupted):
    decisions = _decisions(resumed.out)

    assert decisions == _decisions(uninterrupted)
    assert "none" in decisions.values(), "no edge was pruned, so no changed graph was rebuilt"


def test_resumed_metrics_equal_uninterrupted(resumed, uninterrupted):
    expected = _metrics(uninterrupted)
    actual = _metrics(resumed.out)

    assert [record["epoch"] for record in actual] == [record["epoch"] for record in expected]
    for got, want in zip(actual, expected, strict=True):
        for name in METRICS:
            if want[name] is None:
                assert got[name] is None
            else:
                assert got[name] == pytest.approx(want[name], abs=TOLERANCE), name
        assert got["theta"].keys() == want["theta"].keys()
        for group, options in want["theta"].items():
            assert got["theta"][group] == pytest.approx(options, abs=TOLERANCE), group


def test_resumed_weights_equal_uninterrupted(resumed, uninterrupted):
    expected = _derived_weights(uninterrupted)
    actual = _derived_weights(resumed.out)

    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        difference = (actual[name].double() - tensor.double()).abs().max()
        assert float(difference) <= TOLERANCE, name
