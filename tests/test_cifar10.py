"""The main job end to end on a few hundred real CIFAR-10 images from the shared data folder."""

import json
from pathlib import Path

import pytest
import torch

from fxadapt.cli import main

RESNET20 = f"{Path(__file__).resolve().parents[1] / 'models' / 'resnet20.py'}:ResNet20"


@pytest.fixture(scope="module")
def cifar_run(cifar10_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cifar"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FXADAPT_CACHE", str(cache_dir))
        status = main(
            [
                "train",
                RESNET20,
                "--data",
                "cifar10",
                "--data-dir",
                str(cifar10_root),
                "--epochs",
                "3",
                "--arch-epochs",
                "1",
                "--train-limit",
                "800",
                "--test-limit",
                "200",
                "--batch-size",
                "32",
                "--lr",
                "0.05",
                "--out",
                str(out),
            ]
        )
    return status, out


def test_cifar10_run_beats_chance(cifar_run):
    status, out = cifar_run
    report = json.loads((out / "report.json").read_text())

    assert status == 0
    assert report["accuracy"]["test"] > 0.15
    assert report["data"] == "cifar10"


def test_cifar10_run_exports_the_derived_module(cifar_run):
    _, out = cifar_run
    report = json.loads((out / "report.json").read_text())
    model = torch.jit.load(str(out / "model.ts"))
    exported_parameters = sum(parameter.numel() for parameter in model.parameters())

    assert exported_parameters == report["costs"]["derived"]["parameters"]
    assert exported_parameters <= report["costs"]["original"]["parameters"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_cifar10_run_writes_decisions_and_diagrams(cifar_run):
    _, out = cifar_run
    edges = json.loads((out / "edges.json").read_text())["edges"]
    diagrams = {path.name for path in (out / "diagrams").iterdir()}

    assert len(edges) == 18
    assert all(edge["decision"] in edge["options"] for edge in edges)
    assert {"cell-BasicBlock-1.svg", "cell-BasicBlock-2.svg", "network.svg"} <= diagrams
