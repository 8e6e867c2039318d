"""The HTML run report from a short real run, the theta log and the TensorBoard log."""

import json
import logging
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxadapt
from fxadapt.cli import main
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.html_report import ThetaLog, build_html_report, read_theta_trajectories
from fxadapt.trainer import TrainConfig, Trainer

from conftest import TwoBranch

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"

# Files that the report does not read, left out of copies of the run to keep them small.
_UNREAD = shutil.ignore_patterns("checkpoint.pt", "derived.pt", "model.ts", "theta.jsonl")


class _PageParser(HTMLParser):
    """Collects what the tests check: report values, changed rows, theta panels, figures."""

    def __init__(self):
        super().__init__()
        self.values: list[dict] = []
        self.changed_edges: set[str] = set()
        self.element_ids: set[str] = set()
        self.diagram_files: set[str] = set()
        self.title = ""
        self._value: dict | None = None
        self._in_h1 = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if "id" in attributes:
            self.element_ids.add(attributes["id"])
        if tag == "tr" and attributes.get("class") == "changed":
            self.changed_edges.add(attributes["data-edge"])
        if tag == "figure" and "data-file" in attributes:
            self.diagram_files.add(attributes["data-file"])
        if tag == "h1":
            self._in_h1 = True
        if "data-report" in attributes:
            self._value = {
                "pointer": attributes["data-report"],
                "value": json.loads(attributes["data-value"]),
                "text": "",
            }

    def handle_endtag(self, tag):
        if tag == "h1":
            self._in_h1 = False
        if self._value is not None:
            self.values.append(self._value)
            self._value = None

    def handle_data(self, data):
        if self._in_h1:
            self.title += data
        if self._value is not None:
            self._value["text"] += data


def _parse(text: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(text)
    parser.close()
    return parser


def _resolve(document, pointer: str):
    """Returns the value at a JSON Pointer (RFC 6901) in ``document``."""
    value = document
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        value = value[int(token)] if isinstance(value, list) else value[token]
    return value


def _pointer_to_value(page: _PageParser) -> dict:
    return {value["pointer"]: value for value in page.values}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    # theta learning rate 1.0 makes edges change within one short epoch.
    status = main(
        [
            "train",
            RESNET20,
            "--epochs",
            "2",
            "--arch-epochs",
            "1",
            "--arch-lr",
            "1.0",
            "--train-limit",
            "300",
            "--test-limit",
            "200",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    return out


@pytest.fixture(scope="module")
def report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def page_text(run_dir) -> str:
    return build_html_report(run_dir).read_text()


@pytest.fixture(scope="module")
def page(page_text) -> _PageParser:
    return _parse(page_text)


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the run without its weights and without theta.jsonl."""
    return Path(shutil.copytree(run_dir, tmp_path / "run", ignore=_UNREAD))


def test_report_page_is_self_contained(run_dir, page_text):
    assert (run_dir / "report.html").is_file()
    assert "<style>" in page_text
    assert "<link" not in page_text
    assert "<script" not in page_text
    assert 'src="http' not in page_text
    assert 'src="diagrams/' not in page_text


def test_report_title_names_model_and_data(page):
    assert page.title == "ResNet20 on digits"


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_report_embeds_every_diagram(run_dir, report, page, page_text):
    svgs = [path for path in report["diagrams"] if path.endswith(".svg")]
    cell_type_svgs = {f"diagrams/cell-{name}.svg" for name in report["summary"]["cell_types"]}

    assert cell_type_svgs <= set(svgs)
    assert set(svgs) == page.diagram_files
    for path in svgs:
        text = (run_dir / path).read_text()
        assert text[text.index("<svg") :] in page_text, path


def test_report_has_one_theta_plot_per_group(report, page):
    groups = {row["theta_group"] for row in report["edges"]}
    panel_ids = {name for name in page.element_ids if name.startswith("theta-")}

    assert panel_ids == {f"theta-{group}" for group in groups}


def test_report_writes_plot_files(run_dir, report, page):
    names = {path.name for path in (run_dir / "plots").iterdir()}

    assert {"curves.svg", "curves.png"} <= names
    for cell_type in report["summary"]["cell_types"]:
        assert {f"theta-{cell_type}.svg", f"theta-{cell_type}.png"} <= names


def test_report_values_equal_report_json(report, page):
    assert page.values
    for value in page.values:
        assert value["value"] == _resolve(report, value["pointer"]), value["pointer"]


def test_report_shows_accuracy(report, page):
    pointer_to_value = _pointer_to_value(page)

    for key in ("test", "best_test", "train"):
        text = pointer_to_value[f"/accuracy/{key}"]["text"]
        assert text == f"{100 * report['accuracy'][key]:.2f}%"


def test_report_shows_parameters_and_flops(report, page):
    pointer_to_value = _pointer_to_value(page)

    assert set(report["costs"]) == {"original", "wrapped", "derived"}
    for name, costs in report["costs"].items():
        parameters = pointer_to_value[f"/costs/{name}/parameters"]["text"]
        flops = pointer_to_value[f"/costs/{name}/flops"]["text"]
        assert int(parameters.replace(",", "")) == costs["parameters"]
        assert flops == f"{costs['flops'] / 1e6:.2f}"
    for key in ("parameters", "flops"):
        assert pointer_to_value[f"/ratios/{key}"]["text"] == f"{report['ratios'][key]:.3f}×"


def test_report_shows_every_decision(report, page):
    pointer_to_value = _pointer_to_value(page)

    for index, row in enumerate(report["edges"]):
        text = pointer_to_value[f"/edges/{index}/decision"]["text"]
        assert text.split(" ")[0] == row["decision"], row["edge"]
        assert ("(guard)" in text) == row["guarded"], row["edge"]


def test_report_highlights_changed_edges(run_dir, report, page):
    table = EdgeTable.load(run_dir / "edges.json")
    changed = {edge.name for edge in table.edges if edge.changed}

    assert len(changed) == report["summary"]["changed"] > 0
    assert page.changed_edges == changed


def test_theta_falls_back_to_metrics(run_copy, report):
    trajectories = read_theta_trajectories(run_copy)
    group_to_theta = {row["theta_group"]: row["theta"] for row in report["edges"]}

    assert trajectories.source == "metrics.jsonl"
    assert trajectories.positions == [0.0, 1.0]
    assert set(trajectories.group_to_option_to_values) == set(group_to_theta)
    for group, option_to_values in trajectories.group_to_option_to_values.items():
        final = {option: values[-1] for option, values in option_to_values.items()}
        assert final == pytest.approx(group_to_theta[group]), group


def test_report_reads_theta_log(run_copy, report):
    groups = sorted({row["theta_group"] for row in report["edges"]})
    theta_log = ThetaLog(run_copy)
    for step in (2, 3):
        theta = {group: {"same": 1 - step / 10, "none": 0.0} for group in groups}
        theta_log.write(1, step, 3, theta)

    trajectories = read_theta_trajectories(run_copy)
    page = _parse(build_html_report(run_copy).read_text())

    assert trajectories.source == "theta.jsonl"
    assert trajectories.positions == pytest.approx([0.0, 2 / 3, 1.0])
    assert trajectories.group_to_option_to_values[groups[0]]["same"] == pytest.approx(
        [1.0, 0.8, 0.7]
    )
    assert {f"theta-{group}" for group in groups} <= page.element_ids


def test_report_without_matplotlib_keeps_tables(run_copy, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="fxadapt.html_report"):
        text = build_html_report(run_copy).read_text()
    page = _parse(text)

    assert "fxadapt[report]" in caplog.text
    assert "fxadapt[report]" in text
    assert not any(name.startswith("theta-") for name in page.element_ids)
    assert "/accuracy/test" in _pointer_to_value(page)


def test_report_of_unfinished_run_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")

    with pytest.raises(FxadaptError, match="no report.json"):
        build_html_report(tmp_path)


@pytest.fixture
def tiny_trainer() -> Trainer:
    """A trainer of one architecture epoch and one network epoch, three batches each."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (12,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    wrapped = fxadapt.wrap(TwoBranch(), images[:2])
    config = TrainConfig(epochs=2, arch_epochs=1, batch_size=4, arch_lr=0.1)
    return Trainer(wrapped, loader, loader, config)


def test_theta_log_samples_architecture_steps(tmp_path, tiny_trainer):
    tiny_trainer.on_step = ThetaLog(tmp_path, every=2)
    history = tiny_trainer.fit().history
    samples = [json.loads(line) for line in (tmp_path / "theta.jsonl").read_text().splitlines()]

    assert [(sample["epoch"], sample["step"]) for sample in samples] == [(1, 2), (1, 3)]
    assert [sample["global_step"] for sample in samples] == [2, 3]
    assert samples[-1]["theta"] == history[0].theta
    assert samples[0]["theta"] != samples[-1]["theta"]


def test_theta_log_passes_samples_on(tmp_path):
    received = []
    theta_log = ThetaLog(tmp_path, on_sample=received.append)
    theta_log.write(2, 1, 4, {"e0": {"same": 0.5}})

    assert received == [
        {"epoch": 2, "step": 1, "steps": 4, "global_step": 5, "theta": {"e0": {"same": 0.5}}}
    ]


@pytest.mark.parametrize("every", [0, -3])
def test_theta_log_rejects_bad_interval(tmp_path, every):
    with pytest.raises(ValueError, match="every must be at least 1"):
        ThetaLog(tmp_path, every=every)


def test_tensorboard_log_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fxadapt.tensorboard import TensorBoardLog

    record = {
        "epoch": 1,
        "stage": "architecture",
        "train_loss": 2.25,
        "train_accuracy": 0.125,
        "test_loss": 2.5,
        "test_accuracy": 0.375,
        "lr": 0.025,
        "arch_lr": None,
        "images_per_second": 400.0,
        "seconds": 1.5,
    }
    with TensorBoardLog(tmp_path) as tensorboard:
        tensorboard.log_epoch(record)
        tensorboard.log_theta({"global_step": 7, "theta": {"e0": {"same": 0.75, "none": 0.0}}})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]

    assert [(event.step, event.value) for event in events.Scalars("accuracy/test")] == [(1, 0.375)]
    assert [(event.step, event.value) for event in events.Scalars("theta/e0/same")] == [(7, 0.75)]
    assert "theta/e0/none" not in tags
    assert "lr/theta" not in tags


def test_tensorboard_log_names_extra_when_missing(tmp_path, monkeypatch):
    from fxadapt.tensorboard import TensorBoardLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)

    with pytest.raises(FxadaptError, match=r"fxadapt\[tensorboard\]"):
        TensorBoardLog(tmp_path)


def test_report_modules_import_no_plotting_library():
    code = (
        "import sys, fxadapt.html_report, fxadapt.tensorboard; "
        "print(sorted(name for name in ('matplotlib', 'tensorboard') if name in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
