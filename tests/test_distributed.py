"""Training on two gloo processes under torchrun, on CPU.

Two launches of the same run (same seed, two processes each):

- one machine, the usual command: ``torchrun --nproc_per_node=2 -m fxadapt train ...``;
- two "machines" on loopback, each a torchrun with one process in a folder of its own, and
  the run directory given relative to it. Process 1's folder must stay empty, so only
  process 0 writes. A small launcher records the decisions each process derives, in a file
  outside both folders, before it runs the fxadapt command line.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"
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
    "2",
    "--arch-lr",
    "0.6",
    "--seed",
    "3",
    "--no-draw",
]
TIMEOUT_SECONDS = 600

LAUNCHER = textwrap.dedent(
    """
    import json
    import os
    import sys

    from fxadapt import distributed
    from fxadapt.cli import main

    check_same_decisions = distributed.DistributedParallelism.check_same_decisions


    def record_decisions(self, edge_id_to_decision):
        path = os.path.join(os.environ["DECISIONS_DIR"], f"rank{self.rank}.json")
        with open(path, "w") as stream:
            json.dump(edge_id_to_decision, stream)
        check_same_decisions(self, edge_id_to_decision)


    distributed.DistributedParallelism.check_same_decisions = record_decisions
    sys.exit(main())
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *arguments]


def _decisions(out: Path) -> dict[str, str]:
    edges = json.loads((out / "edges.json").read_text())["edges"]
    return {str(edge["id"]): edge["decision"] for edge in edges}


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_machine(tmp_path_factory):
    out = tmp_path_factory.mktemp("one_machine") / "run"
    command = _torchrun(
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "fxadapt",
        "train",
        MODEL,
        *OPTIONS,
        "--out",
        str(out),
        "--resume",
        "auto",
        "-v",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    return result, out


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_machines")
    launcher = root / "launch.py"
    launcher.write_text(LAUNCHER)
    decisions_dir = root / "decisions"
    decisions_dir.mkdir()
    port = _free_port()
    folders, processes = [], []
    for node in (0, 1):
        folder = root / f"machine{node}"
        folder.mkdir()
        command = _torchrun(
            "--nnodes=2",
            f"--node_rank={node}",
            "--nproc_per_node=1",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(launcher),
            "train",
            MODEL,
            *OPTIONS,
            "--out",
            "run",
        )
        # torchrun sets one thread per process only with several processes per machine;
        # the same thread count as the one-machine launch gives the same sums.
        environment = {**os.environ, "DECISIONS_DIR": str(decisions_dir), "OMP_NUM_THREADS": "1"}
        processes.append(
            subprocess.Popen(
                command,
                cwd=folder,
                env=environment,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        folders.append(folder)
    results = [process.communicate(timeout=TIMEOUT_SECONDS) for process in processes]
    statuses = [process.returncode for process in processes]
    return statuses, results, folders, decisions_dir


def test_one_machine_run_finishes(one_machine):
    result, out = one_machine

    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_metrics(out)) == 3
    assert (out / "derived.pt").is_file()
    assert (out / "model.ts").is_file()
    assert "all 2 processes derived the same decisions" in result.stderr


def test_both_processes_derive_same_decisions(two_machines):
    statuses, results, folders, decisions_dir = two_machines
    rank0 = json.loads((decisions_dir / "rank0.json").read_text())
    rank1 = json.loads((decisions_dir / "rank1.json").read_text())

    assert statuses == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    assert rank0 == rank1
    assert rank0 == _decisions(folders[0] / "run")


def test_only_rank0_writes_run_directory(two_machines):
    statuses, _, folders, _ = two_machines

    assert statuses == [0, 0]
    assert sorted(path.name for path in folders[1].iterdir()) == []
    assert (folders[0] / "run" / "checkpoint.pt").is_file()
    assert (folders[0] / "run" / "report.json").is_file()


def test_launches_agree(one_machine, two_machines):
    _, out = one_machine
    _, _, folders, _ = two_machines
    expected = _metrics(out)
    actual = _metrics(folders[0] / "run")

    assert _decisions(folders[0] / "run") == _decisions(out)
    for got, want in zip(actual, expected, strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
        assert got["test_loss"] == pytest.approx(want["test_loss"], abs=1e-6)
