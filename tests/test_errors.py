"""Bad input: one line naming the problem and the fix, exit status 2, and no file lost.

Every case of a new run passes --overwrite over a folder of earlier files, the most
dangerous way to meet bad input: the folder must come through byte for byte.
"""

import contextlib
import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

# Imported before any test captures stderr: on a machine with CUDA_HOME set but no CUDA
# runtime, torch logs a one-time warning when fxadapt.run first loads torch.utils.benchmark.
import fxadapt.run  # noqa: F401
from fxadapt.cli import main

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"
SMALL_DATA = ["--train-limit", "200", "--test-limit", "100", "--batch-size", "32"]

# Models that fail in the ways a user's model can. NanAfter returns NaN after `calls` forward
# passes in training mode. Its Poison module calls bool() on a tensor, so torch.fx keeps it
# as a leaf and runs its Python every time.
MODELS_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Plain(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x)).mean(dim=(2, 3)))


    class Untraceable(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return self.head(torch.relu(self.stem(x)).mean(dim=(2, 3)))


    class GreyNet(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.head = nn.Linear(4, num_classes)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + self.conv(x)
            return self.head(x.mean(dim=(2, 3)))


    class Poison(nn.Module):
        def __init__(self, calls):
            super().__init__()
            self.calls = calls
            self.count = 0

        def forward(self, x):
            if bool(x.isfinite().all()) and self.training:
                self.count += 1
                if self.count > self.calls:
                    return x * float("nan")
            return x


    class NanAfter(nn.Module):
        def __init__(self, calls=16, num_classes=10):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.poison = Poison(calls)
            self.head = nn.Linear(8, num_classes)

        def forward(self, x):
            x = torch.relu(self.stem(x))
            x = x + self.bn(self.conv(x))
            x = self.poison(x)
            return self.head(x.mean(dim=(2, 3)))
    """
)


@pytest.fixture(scope="module")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "broken_models.py"
    path.write_text(MODELS_SOURCE)
    return path


@pytest.fixture(scope="module")
def image_trees(tmp_path_factory) -> dict[str, Path]:
    """Two image-folder trees: one in the wrong layout, one with damaged files."""
    root = tmp_path_factory.mktemp("images")
    wrong_layout = root / "wrong"
    (wrong_layout / "images" / "a").mkdir(parents=True)
    damaged = root / "damaged"
    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = damaged / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (8, 8), (40 * index, 0, 0)).save(folder / f"{index}.png")
    (damaged / "train" / "a" / "3.png").write_bytes(b"not a png")
    (damaged / "train" / "b" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return {"wrong_layout": wrong_layout, "damaged": damaged}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A folder holding the files of an earlier run."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"earlier": True}))
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    (out / "checkpoint.pt").write_bytes(bytes(range(256)) * 4)
    (out / "report.md").write_text("# earlier run\n")
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _run(capsys, *arguments) -> tuple[int, list[str], str]:
    status = main([str(argument) for argument in arguments])
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    return status, lines, stderr


# Each case: its id, the train arguments (a function of the fixtures' paths) and a part of
# the message that names the problem or the fix.
NEW_RUN_CASES = [
    ("model_file_missing", lambda paths: ["missing/model.py:Net"], "model file missing/model.py"),
    (
        "class_missing",
        lambda paths: [RESNET20.replace(":ResNet20", ":ResNet21")],
        "class ResNet21 not found",
    ),
    (
        "constructor_raises",
        lambda paths: [RESNET20, "--model-arg", "depth=21"],
        "ResNet20(depth=21) raised ValueError",
    ),
    (
        "root_not_traceable",
        lambda paths: [f"{paths['models']}:Untraceable"],
        "cannot trace Untraceable.forward",
    ),
    (
        "no_adaptable_edge",
        lambda paths: [f"{paths['models']}:Plain"],
        "no additive merge",
    ),
    (
        "data_directory_missing",
        lambda paths: [RESNET20, "--data", "cifar10", "--data-dir", "/no/such/folder"],
        "data directory /no/such/folder not found",
    ),
    (
        "data_directory_wrong_layout",
        lambda paths: [RESNET20, "--data", "imagefolder", "--data-dir", paths["wrong_layout"]],
        "train",
    ),
    (
        "unreadable_images",
        lambda paths: [RESNET20, "--data", "imagefolder", "--data-dir", paths["damaged"]],
        "cannot be decoded",
    ),
    (
        "input_shape_mismatch",
        lambda paths: [f"{paths['models']}:GreyNet"],
        "expects 1 input channels",
    ),
    (
        "class_count_mismatch",
        lambda paths: [RESNET20, "--model-arg", "num_classes=100"],
        "--model-arg num_classes=10",
    ),
    (
        "arch_epochs_above_epochs",
        lambda paths: [RESNET20, "--epochs", "2", "--arch-epochs", "3"],
        "--arch-epochs 3 must be between 0 and --epochs 2",
    ),
    (
        "cuda_missing",
        lambda paths: [RESNET20, "--device", "cuda"],
        "use --device cpu",
    ),
]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [pytest.param(arguments, message, id=case) for case, arguments, message in NEW_RUN_CASES],
)
def test_bad_input_keeps_earlier_files(
    arguments, message, models_file, image_trees, earlier_run, capsys, monkeypatch, tmp_path
):
    arguments = arguments({"models": models_file, **image_trees})
    if "cuda" in arguments and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    monkeypatch.setenv("FXADAPT_CACHE", str(tmp_path / "cache"))
    before = _snapshot(earlier_run)

    status, lines, stderr = _run(
        capsys, "train", *arguments, *SMALL_DATA, "--out", earlier_run, "--overwrite"
    )

    assert status == 2
    assert len(lines) == 1, stderr
    assert message in lines[0]
    assert "Traceback" not in stderr
    assert _snapshot(earlier_run) == before


@pytest.fixture(scope="module")
def nan_run(models_file, tmp_path_factory):
    """A run whose loss turns NaN in epoch 2 of its architecture stage."""
    out = tmp_path_factory.mktemp("nan") / "run"
    arguments = [
        "train",
        f"{models_file}:NanAfter",
        *SMALL_DATA,
        "--epochs",
        "4",
        "--arch-epochs",
        "3",
        "--no-draw",
        "--out",
        str(out),
    ]
    with contextlib.redirect_stderr(io.StringIO()) as stderr:
        status = main(arguments)
    return status, out, arguments, stderr.getvalue()


def test_nan_loss_names_the_step(nan_run):
    status, out, _, stderr = nan_run
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]

    assert status == 2
    assert len(lines) == 1
    assert "became NaN or infinite at epoch 2, step" in lines[0]
    assert f"the checkpoint of epoch 1 in {out} is kept" in lines[0]
    assert "Traceback" not in stderr


def test_nan_loss_keeps_last_good_checkpoint(nan_run):
    _, out, _, _ = nan_run
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    metrics = (out / "metrics.jsonl").read_text().splitlines()

    assert checkpoint["epoch"] == 1
    assert checkpoint["unfinished"] is None
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert len(metrics) == 1
    assert (out / "config.json").is_file()
    assert (out / "edges.json").is_file()


def test_export_before_derivation_is_rejected(nan_run, capsys):
    _, out, _, _ = nan_run
    before = _snapshot(out)

    status, lines, stderr = _run(capsys, "export", out)

    assert status == 2
    assert len(lines) == 1, stderr
    assert "has not derived yet" in lines[0]
    assert f"--resume {out}" in lines[0]
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--lr", "0.1"], "--lr 0.1 does not match the run's 0.025"),
        (["--seed", "5"], "--seed 5 does not match the run's 0"),
        (["--epochs", "6"], "--epochs 6 does not match the run's 4"),
    ],
)
def test_resume_with_other_options_is_rejected(nan_run, change, message, capsys):
    _, out, arguments, _ = nan_run
    before = _snapshot(out)

    status, lines, stderr = _run(capsys, *arguments, *change, "--resume", out)

    assert status == 2
    assert len(lines) == 1, stderr
    assert message in lines[0]
    assert _snapshot(out) == before


def test_resume_with_other_model_is_rejected(nan_run, capsys):
    _, out, arguments, _ = nan_run
    before = _snapshot(out)
    other_model = [RESNET20 if index == 1 else argument for index, argument in enumerate(arguments)]

    status, lines, stderr = _run(capsys, *other_model, "--resume", out)

    assert status == 2
    assert len(lines) == 1, stderr
    assert "the model" in lines[0]
    assert "does not match" in lines[0]
    assert _snapshot(out) == before


def test_resume_of_folder_without_run(tmp_path, capsys):
    status, lines, _ = _run(capsys, "train", "--resume", tmp_path)

    assert status == 2
    assert len(lines) == 1
    assert "config.json not found" in lines[0]


def test_resume_and_overwrite_together(nan_run, capsys):
    _, out, arguments, _ = nan_run
    before = _snapshot(out)

    status, lines, _ = _run(capsys, *arguments, "--resume", out, "--overwrite")

    assert status == 2
    assert len(lines) == 1
    assert "pass one of them" in lines[0]
    assert _snapshot(out) == before


def test_missing_model_without_resume(capsys):
    status, lines, _ = _run(capsys, "train")

    assert status == 2
    assert len(lines) == 1
    assert "MODEL is missing" in lines[0]
