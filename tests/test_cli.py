"""The command line: the main job end to end, and one clear line for each bad input."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fxadapt.cli import main

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"


def _run(capsys, *arguments):
    status = main(list(arguments))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    started = time.perf_counter()
    status = main(
        [
            "train",
            RESNET20,
            "--arch-epochs",
            "1",
            "--arch-lr",
            "0.05",
            "--epochs",
            "3",
            "--lr",
            "0.05",
            "--train-limit",
            "800",
            "--batch-size",
            "32",
            "--out",
            str(out),
        ]
    )
    return status, out, time.perf_counter() - started


def test_digits_run_finishes_within_a_minute(digits_run):
    status, out, seconds = digits_run

    assert status == 0
    assert seconds < 60


def test_digits_run_writes_its_files(digits_run):
    _, out, _ = digits_run
    names = {path.name for path in out.iterdir()}

    assert {"config.json", "edges.json", "report.json", "report.md", "model.ts"} <= names
    assert {"metrics.jsonl", "checkpoint.pt", "derived.pt"} <= names
    assert any(path.suffix == ".svg" for path in (out / "diagrams").iterdir())


def test_digits_run_learns(digits_run):
    _, out, _ = digits_run
    report = json.loads((out / "report.json").read_text())
    edges = json.loads((out / "edges.json").read_text())["edges"]

    assert report["accuracy"]["test"] > 0.5
    assert len(edges) == 18
    assert all(edge["decision"] in edge["options"] for edge in edges)
    assert report["costs"]["derived"]["parameters"] <= report["costs"]["original"]["parameters"]


def test_metrics_log_has_one_line_per_epoch(digits_run):
    _, out, _ = digits_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert [record["stage"] for record in records] == ["architecture", "network", "network"]
    assert set(records[0]["theta"]) == {f"e{index}" for index in range(18)}


def test_export_command_rebuilds_the_derived_module(digits_run, capsys):
    _, out, _ = digits_run
    status, stdout, _ = _run(capsys, "export", str(out), "--format", "exported-program")
    scripted = torch.jit.load(str(out / "model.ts"))
    program = torch.export.load(str(out / "model.pt2")).module()
    example = torch.randn(2, 3, 32, 32)

    assert status == 0
    assert "model.pt2" in stdout
    with torch.no_grad():
        assert torch.allclose(scripted(example), program(example), atol=1e-5)


def test_draw_command_lists_the_diagrams(digits_run, capsys):
    _, out, _ = digits_run
    status, stdout, _ = _run(capsys, "draw", str(out))

    assert status == 0
    assert ".svg" in stdout


def test_existing_run_directory_is_kept(digits_run, capsys):
    _, out, _ = digits_run
    before = (out / "report.json").read_text()
    status, _, stderr = _run(
        capsys, "train", RESNET20, "--epochs", "1", "--arch-epochs", "1", "--out", str(out)
    )

    assert status == 2
    assert "already holds files" in stderr
    assert "--overwrite" in stderr
    assert (out / "report.json").read_text() == before


def test_wrap_prints_edges_and_cell_types(tmp_path, capsys):
    status, stdout, _ = _run(capsys, "wrap", RESNET20, "--out", str(tmp_path), "--no-draw")

    assert status == 0
    assert "18 edges, 18 theta groups" in stdout
    assert "7 allow identity" in stdout
    assert "cell type BasicBlock-1: 7 cells" in stdout
    assert (tmp_path / "edges.json").is_file()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["wrap", "missing/model.py:Net"], "model file missing/model.py not found"),
        (["wrap", f"{REPO / 'models' / 'resnet20.py'}:ResNet21"], "class ResNet21 not found"),
        (["wrap", "fxadapt.no_such_module:Net"], "module fxadapt.no_such_module not found"),
        (["wrap", RESNET20, "--model-arg", "depth=21"], "ResNet20(depth=21) raised"),
        (
            ["train", RESNET20, "--data", "cifar10", "--data-dir", "/no/such/folder"],
            "/no/such/folder",
        ),
        (["train", RESNET20, "--data", "cifar10"], "--data-dir"),
        (["train", RESNET20, "--epochs", "2", "--arch-epochs", "3"], "--arch-epochs 3"),
        (["train", RESNET20, "--device", "cuda:7"], "CUDA"),
        (["train", RESNET20, "--theta-every", "0"], "--theta-every must be at least 1"),
        (["train", RESNET20, "--objective", "simclr", "--knn-k", "0"], "--knn-k must be"),
    ],
)
def test_bad_input_gives_one_line(arguments, message, capsys, tmp_path):
    status, _, stderr = _run(capsys, *arguments, "--out", str(tmp_path / "run"))
    lines = [line for line in stderr.splitlines() if line.strip()]

    assert status == 2
    assert len(lines) == 1
    assert message in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["train", RESNET20, "--bogus"], "unrecognized arguments: --bogus (see fxadapt train"),
        (["train", RESNET20, "--epochs", "x"], "invalid int value: 'x' (see fxadapt train"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
)
def test_bad_option_gives_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(arguments)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]

    assert stopped.value.code == 2
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_wrong_data_layout_is_named(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    status, _, stderr = _run(
        capsys,
        "train",
        RESNET20,
        "--data",
        "cifar10",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "run"),
    )

    assert status == 2
    assert "train" in stderr
    assert "Traceback" not in stderr


def test_debug_shows_the_traceback(capsys, tmp_path):
    status, _, stderr = _run(capsys, "wrap", "missing/model.py:Net", "--debug")

    assert status == 2
    assert "Traceback" in stderr


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fxadapt", "train", "--help"], capture_output=True, text=True
    )

    assert result.returncode == 0
    assert "--arch-epochs" in result.stdout
