"""The cost benchmark runs end to end on a tiny configuration and writes every ratio.

Only the presence and sign of the results are checked: timings on a test machine are too
noisy to assert on.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

RATIO_KEYS = (
    "forward_ratio",
    "arch_epoch_ratio",
    "arch_epoch_ratio_joint",
    "network_epoch_ratio",
    "total_ratio_tenth",
    "total_ratio_quarter",
    "peak_memory_ratio",
    "latency_ratio_b1",
    "latency_ratio_b128",
    "latency_ratio_b1_torchscript",
    "latency_ratio_b128_torchscript",
    "flops_ratio",
)


@pytest.fixture(scope="module")
def cost_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cost") / "cost.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "cost.py"),
        "models/resnet20.py:ResNet20",
        "--data",
        "digits",
        "--train-limit",
        "100",
        "--test-limit",
        "20",
        "--epochs",
        "2",
        "--batch-size",
        "50",
        "--forward-rounds",
        "1",
        "--latency-rounds",
        "1",
        "--latency-min-time",
        "0.01",
        "--memory-steps",
        "1",
        "--memory-repeats",
        "1",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(out.read_text()), out, finished.stdout


@pytest.mark.parametrize("key", RATIO_KEYS)
def test_cost_ratio_is_positive(cost_results, key):
    results, _, _ = cost_results

    assert key in results
    assert results[key] > 0


def test_cost_writes_markdown_table(cost_results):
    _, out, stdout = cost_results
    table = out.with_suffix(".md").read_text()

    for key in RATIO_KEYS:
        assert f"`{key}`" in table
    assert "| Ratio |" in stdout


def test_cost_runs_share_batches(cost_results):
    results, _, _ = cost_results
    plain_epochs = [sample for sample in results["epochs"] if sample["run"] == "plain"]
    joint_epochs = [sample for sample in results["epochs"] if sample["run"] == "joint"]

    assert [sample["epoch"] for sample in plain_epochs] == [1, 2]
    assert [sample["stage"] for sample in joint_epochs] == ["architecture"]
    assert results["runs"]["adapt_tenth"]["arch_epochs"] == 1


def test_cost_probes_memory_in_processes(cost_results):
    results, _, _ = cost_results
    reports = results["memory"]["reports"]

    assert set(reports) == {"plain", "alternate", "joint"}
    for variant_reports in reports.values():
        assert variant_reports[0]["peak_bytes"] > 0


def test_cost_rejects_device_options_on_cpu(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "cost.py"),
        "models/resnet20.py:ResNet20",
        "--data",
        "digits",
        "--bf16",
        "--out",
        str(tmp_path / "cost.json"),
    ]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)

    assert finished.returncode == 2
    assert "--bf16 needs --device cuda" in finished.stderr
