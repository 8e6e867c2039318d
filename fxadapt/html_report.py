"""The HTML run report: one self-contained page with the plots, tables and diagrams of a run.

``build_html_report(run_dir)`` reads a finished run directory and writes two things into it:

- ``plots/``: matplotlib figures as SVG and PNG. ``theta-<cell type>`` draws the theta
  trajectories of every theta group of that cell type as small multiples, and ``curves``
  draws the loss and accuracy of every epoch with the derivation marked.
- ``report.html``: a page with its CSS inline and every plot and Graphviz diagram inlined as
  SVG (or as a base64 PNG where only a PNG exists), so the single file can be mailed.

The numbers on the page come from ``report.json``. Every number and decision in a table or
summary card carries ``data-report``, a JSON Pointer (RFC 6901) into ``report.json``, and
``data-value``, the JSON text of the value there, so a script can check the page against the
report.

The theta trajectories come from ``theta.jsonl``, which ``ThetaLog`` writes every few
architecture steps. When a run has no ``theta.jsonl``, they come from the per-epoch theta in
``metrics.jsonl``. ``ThetaLog`` lives here because this module is the reader of its file.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fxadapt.costs import LATENCY_ROUNDS
from fxadapt.draw import RED
from fxadapt.edges import EdgeTable
from fxadapt.errors import FxadaptError
from fxadapt.mixed import THETA_INIT
from fxadapt.rundir import RunDir

if TYPE_CHECKING:
    from fxadapt.trainer import Trainer

__all__ = [
    "THETA_LOG",
    "ThetaLog",
    "ThetaTrajectories",
    "build_html_report",
    "read_theta_trajectories",
]

logger = logging.getLogger(__name__)

THETA_LOG = "theta.jsonl"
"""File name of the sampled theta in a run directory."""

REPORT_HTML = "report.html"
PLOTS = "plots"

_OPTION_COLORS = {"same": "#1f77b4", "identity": "#ff7f0e"}
_ZERO_COLOR = "#7f7f7f"
_PANEL_COLUMNS = 6
_MISSING_MATPLOTLIB = (
    "matplotlib is not installed, so report.html has no plots: pip install 'fxadapt[report]'"
)


class ThetaLog:
    """Appends the theta of every theta group to ``RUN/theta.jsonl`` every few steps.

    An instance is the trainer's ``on_step(trainer, epoch, step)`` callback. It samples the
    architecture stage only, and reads theta from the trainer only on the steps it writes.
    Each line is one sample::

        {"epoch": 1, "step": 10, "steps": 25, "global_step": 10,
         "theta": {"e0": {"same": 0.93, "identity": -0.04, "none": 0.0}, ...}}

    The file is only appended to, so a resumed run continues it. When a step is logged twice,
    the reader keeps the last sample.

    Args:
        run_dir: the run directory.
        every: steps between two samples. The last step of every epoch is sampled as well,
            so the trajectories end at the per-epoch theta of ``metrics.jsonl``.
        on_sample: called with each sample after it is written, for example
            ``TensorBoardLog.log_theta``.

    Raises:
        ValueError: when ``every`` is less than 1.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        every: int = 10,
        on_sample: Callable[[dict], None] | None = None,
    ):
        if every < 1:
            raise ValueError(f"every must be at least 1 step, got {every}")
        self.path = Path(run_dir) / THETA_LOG
        self.every = every
        self.on_sample = on_sample

    def __call__(self, trainer: Trainer, epoch: int, step: int) -> None:
        """Writes one sample when ``step`` of the architecture stage is due.

        Args:
            trainer: the trainer, which gives the stage, the batches per epoch and theta.
            epoch: the epoch, counted from 1 as in ``metrics.jsonl``.
            step: the step within the epoch, counted from 1.
        """
        if trainer.stage != "architecture":
            return
        steps = len(trainer.train_loader)
        if step % self.every == 0 or step == steps:
            self.write(epoch, step, steps, trainer.theta_values())

    def write(
        self, epoch: int, step: int, steps: int, theta_values: Mapping[str, Mapping[str, float]]
    ) -> dict:
        """Appends one sample and returns it. Training loops other than ``Trainer`` call it.

        Args:
            epoch: the epoch, counted from 1.
            step: the step within the epoch, counted from 1.
            steps: the steps of one epoch, which places the sample within its epoch.
            theta_values: theta group to option to value.
        """
        sample = {
            "epoch": epoch,
            "step": step,
            "steps": steps,
            "global_step": (epoch - 1) * steps + step,
            "theta": {
                group: {option: float(value) for option, value in options.items()}
                for group, options in theta_values.items()
            },
        }
        with open(self.path, "a") as stream:
            stream.write(json.dumps(sample) + "\n")
        if self.on_sample is not None:
            self.on_sample(sample)
        return sample


@dataclass
class ThetaTrajectories:
    """The theta of every theta group over the architecture stage.

    Attributes:
        source: the file the samples came from, ``theta.jsonl`` or ``metrics.jsonl``.
        positions: the place of each sample in epochs since training began. 0 is the start,
            where every theta has its value from ``THETA_INIT``, and 1.0 is the end of epoch 1.
        group_to_option_to_values: theta group to option to its value at each position
            (NaN where a sample lacks the option).
    """

    source: str
    positions: list[float] = field(default_factory=list)
    group_to_option_to_values: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def read_theta_trajectories(run_dir: str | os.PathLike) -> ThetaTrajectories:
    """Reads the theta trajectories of a run from ``theta.jsonl``, else from ``metrics.jsonl``.

    Args:
        run_dir: the run directory.

    Returns:
        The trajectories, empty of positions when the run has no architecture stage.

    Raises:
        FxadaptError: when ``run_dir`` is not a run directory.
    """
    run = RunDir(run_dir, create=False)
    theta_log = run.file(THETA_LOG)
    if theta_log.is_file():
        samples = _read_json_lines(theta_log)
        position_to_theta = {
            sample["epoch"] - 1 + sample["step"] / sample["steps"]: sample["theta"]
            for sample in samples
        }
        source = THETA_LOG
    else:
        position_to_theta = {
            float(record["epoch"]): record["theta"]
            for record in _epoch_records(run)
            if record.get("theta")
        }
        source = RunDir.METRICS
    return _trajectories(source, position_to_theta)


def build_html_report(run_dir: str | os.PathLike) -> Path:
    """Writes ``report.html`` and the plots in ``plots/`` for a finished run.

    Without matplotlib the page is still written, with a note in place of each plot, and a
    warning is logged.

    Args:
        run_dir: the run directory that ``fxadapt train`` wrote.

    Returns:
        The path of ``report.html``.

    Raises:
        FxadaptError: when ``run_dir`` is not a run directory or has no ``report.json``.
    """
    run = RunDir(run_dir, create=False)
    if not run.file(RunDir.REPORT_JSON).is_file():
        raise FxadaptError(
            f"{run.path} has no {RunDir.REPORT_JSON}, so the run has not finished: let "
            "`fxadapt train` run to its end first"
        )
    report = _with_changed_flags(run, run.read_json(RunDir.REPORT_JSON))
    records = _epoch_records(run)
    trajectories = read_theta_trajectories(run.path)

    if _has_matplotlib():
        plots = _Plots(run.path / PLOTS)
        plots.draw(report, records, trajectories)
    else:
        logger.warning(_MISSING_MATPLOTLIB)
        plots = _Plots(None)

    page = _page(run, report, trajectories, plots)
    path = run.write_text(REPORT_HTML, page)
    logger.info("wrote %s", path)
    return path


def _with_changed_flags(run: RunDir, report: dict) -> dict:
    """Copies the report and adds a ``changed`` flag to each edge row.

    The flag comes from the edge table in ``edges.json``, which also defines the report's
    count of changed edges.
    """
    changed = {edge.name for edge in EdgeTable.load(run.file(RunDir.EDGES)).edges if edge.changed}
    edges = [dict(row, changed=row["edge"] in changed) for row in report["edges"]]
    return dict(report, edges=edges)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _read_json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _epoch_records(run: RunDir) -> list[dict]:
    """Returns one record per epoch from ``metrics.jsonl``, else from the history in the report.

    A resumed run may log an epoch twice, and the later record wins.
    """
    metrics = run.file(RunDir.METRICS)
    if metrics.is_file():
        records = _read_json_lines(metrics)
    else:
        records = run.read_json(RunDir.REPORT_JSON).get("history", [])
    epoch_to_record = {record["epoch"]: record for record in records}
    return [epoch_to_record[epoch] for epoch in sorted(epoch_to_record)]


def _trajectories(source: str, position_to_theta: dict[float, dict]) -> ThetaTrajectories:
    trajectories = ThetaTrajectories(source)
    if not position_to_theta:
        return trajectories
    positions = sorted(position_to_theta)
    groups = position_to_theta[positions[-1]]

    # Every mixed edge starts from THETA_INIT, so the start is known without a sample.
    trajectories.positions = [0.0, *positions]
    for group, options in groups.items():
        trajectories.group_to_option_to_values[group] = {
            option: [THETA_INIT[option]]
            + [position_to_theta[p].get(group, {}).get(option, math.nan) for p in positions]
            for option in options
        }
    return trajectories


def _cell_type_to_rows(edge_rows: list[dict]) -> dict[str, list[dict]]:
    """Groups the report's edge rows by cell type, in the order of their first edge."""
    cell_type_to_rows: dict[str, list[dict]] = {}
    for row in edge_rows:
        cell_type_to_rows.setdefault(row["cell_type"] or "(root)", []).append(row)
    return cell_type_to_rows


def _group_to_rows(rows: list[dict]) -> dict[str, list[dict]]:
    group_to_rows: dict[str, list[dict]] = {}
    for row in rows:
        group_to_rows.setdefault(row["theta_group"], []).append(row)
    return group_to_rows


def _decision_text(rows: list[dict]) -> str:
    """Returns the decisions of the edges of one theta group, counted when they differ."""
    counts = Counter(
        (row["decision"] or "-") + (" (guard)" if row["guarded"] else "") for row in rows
    )
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{decision} ×{count}" for decision, count in counts.items())


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _stage_counts(records: list[dict]) -> tuple[int, int]:
    """Returns the number of architecture epochs and of network epochs that ran."""
    architecture = sum(record["stage"] == "architecture" for record in records)
    return architecture, len(records) - architecture


class _Plots:
    """Draws the report's matplotlib figures into ``folder`` and stores their SVG paths.

    ``folder`` is None when matplotlib is missing, and then no plot exists.
    """

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.cell_type_to_theta_svg: dict[str, Path] = {}
        self.curves_svg: Path | None = None

    @property
    def available(self) -> bool:
        return self.folder is not None

    def draw(self, report: dict, records: list[dict], trajectories: ThetaTrajectories) -> None:
        """Draws every figure. matplotlib must be installed."""
        self.folder.mkdir(exist_ok=True)
        if trajectories.positions:
            for cell_type, rows in _cell_type_to_rows(report["edges"]).items():
                figure = _theta_figure(rows, trajectories, report["config"]["wrap"]["scope"])
                if figure is None:
                    continue
                stem = self.folder / f"theta-{_file_stem(cell_type)}"
                self.cell_type_to_theta_svg[cell_type] = _save(figure, stem)
        if records:
            self.curves_svg = _save(_curves_figure(records), self.folder / "curves")


def _new_figure(width: float, height: float):
    """Returns a matplotlib Figure drawn by the Agg canvas, outside pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, stem: Path) -> Path:
    """Writes ``stem.svg`` and ``stem.png`` and returns the SVG path."""
    import matplotlib

    # Text stays text in the SVG, which keeps the inlined figures small and searchable.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(stem.with_suffix(".svg"), format="svg", metadata={"Date": None})
    figure.savefig(stem.with_suffix(".png"), format="png", dpi=110)
    logger.info("wrote %s.svg and %s.png", stem, stem)
    return stem.with_suffix(".svg")


def _theta_figure(rows: list[dict], trajectories: ThetaTrajectories, scope: str):
    """Draws one panel per theta group of a cell type, with the decision marked at the end.

    Returns None when no theta group of the cell type was sampled.
    """
    group_to_rows = {
        group: group_rows
        for group, group_rows in _group_to_rows(rows).items()
        if group in trajectories.group_to_option_to_values
    }
    if not group_to_rows:
        return None
    columns = max(1, min(len(group_to_rows), _PANEL_COLUMNS))
    lines = max(1, math.ceil(len(group_to_rows) / columns))
    # 2.05 inches per panel fits six panels across the page at their natural size.
    figure = _new_figure(2.05 * columns, 1.7 * lines + 0.6)
    panels = list(figure.subplots(lines, columns, sharex=True, sharey=True, squeeze=False).flat)

    for panel, (group, group_rows) in zip(
        panels[: len(group_to_rows)], group_to_rows.items(), strict=True
    ):
        _draw_theta_panel(panel, group, group_rows, trajectories, scope)
    for panel in panels[len(group_to_rows) :]:
        panel.set_visible(False)

    figure.legend(handles=_theta_legend_handles(), loc="outside upper center", ncols=2, fontsize=8)
    figure.supxlabel("epoch", fontsize=8)
    return figure


def _draw_theta_panel(panel, group: str, rows: list[dict], trajectories, scope: str) -> None:
    positions = trajectories.positions
    option_to_values = trajectories.group_to_option_to_values[group]
    # theta_none is the constant 0 of this line, so an edge turns none when every other theta
    # falls below it.
    panel.axhline(0.0, color=_ZERO_COLOR, linestyle="--", linewidth=0.9)
    for option, values in option_to_values.items():
        if option != "none":
            panel.plot(positions, values, color=_OPTION_COLORS[option], linewidth=1.4)

    changed = any(row["changed"] for row in rows)
    for decision in {row["decision"] for row in rows if row["decision"]}:
        final = option_to_values.get(decision, [0.0])[-1]
        panel.plot(
            positions[-1],
            final,
            marker="o",
            markersize=6,
            color=RED if changed else "black",
            clip_on=False,
        )

    if scope == "cell":
        title = f"{group}\n{len(rows)} edges: {_decision_text(rows)}"
    else:
        title = f"{group} {rows[0]['cell']}\n{_decision_text(rows)}"
    panel.set_title(title, fontsize=8, color=RED if changed else "black")
    panel.tick_params(labelsize=7)
    panel.grid(alpha=0.25)
    # The gid becomes the id of the panel's group in the SVG, one per theta group.
    panel.set_gid(f"theta-{group}")


def _theta_legend_handles():
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=_OPTION_COLORS["same"], label="theta same"),
        Line2D([], [], color=_OPTION_COLORS["identity"], label="theta identity"),
        Line2D([], [], color=_ZERO_COLOR, linestyle="--", label="theta none = 0"),
        Line2D([], [], color=RED, marker="o", linestyle="", label="decision (red: changed)"),
    ]


def _curves_figure(records: list[dict]):
    """Draws loss and accuracy per epoch, train and test, with the derivation marked."""
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(9.0, 3.0)
    loss_panel, accuracy_panel = figure.subplots(1, 2)
    last_epoch = records[-1]["epoch"]
    architecture, _ = _stage_counts(records)
    # The network is derived after the last architecture epoch and before the next one.
    derivation = architecture + 0.5

    for panel, key, label in (
        (loss_panel, "loss", "loss"),
        (accuracy_panel, "accuracy", "accuracy (%)"),
    ):
        scale = 100.0 if key == "accuracy" else 1.0
        for split, style in (("train", "-"), ("test", "--")):
            # An objective without labels (self-supervised) leaves some of these as None.
            points = [
                (record["epoch"], scale * record[f"{split}_{key}"])
                for record in records
                if record.get(f"{split}_{key}") is not None
            ]
            if points:
                point_epochs, values = zip(*points, strict=True)
                panel.plot(point_epochs, values, style, marker="o", markersize=3, label=split)
        panel.axvspan(0.5, derivation, color="#e8eef7", zorder=0)
        panel.axvline(derivation, color=RED, linewidth=1.2)
        panel.set_xlabel("epoch (shaded: architecture stage; red line: derivation)")
        panel.set_ylabel(label)
        panel.set_xlim(0.5, max(last_epoch, derivation) + 0.5)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.grid(alpha=0.25)
        if panel.lines:
            panel.legend(fontsize=8)
        panel.set_gid(f"curves-{key}")
    return figure


# The page. Each function below returns the HTML of one part of it.

_CSS = (
    f":root {{ --red: {RED}; }}"
    + """
:root { --ink: #1d2330; --muted: #5b6472; --line: #d9dde3; --tint: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: #fff; }
main { max-width: 1240px; margin: 0 auto; padding: 20px 24px 48px; }
header h1 { margin: 0; font-size: 26px; }
header .kicker { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .06em; }
header .facts { color: var(--muted); margin: 4px 0 0; }
nav { margin: 12px 0 0; display: flex; gap: 14px; flex-wrap: wrap; font-size: 13px; }
nav a { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 12px;
  margin: 18px 0 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
  background: var(--tint); }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .05em; }
.card .big { font-size: 30px; font-weight: 650; line-height: 1.2; }
.card .sub { color: var(--muted); font-size: 13px; }
.card.alert { border-color: var(--red); }
.verdict { font-size: 16px; margin: 6px 0 8px; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin: 0 0 8px; padding: 0; }
.chips li { list-style: none; border: 1px solid var(--red); color: var(--red); border-radius: 12px;
  padding: 1px 9px; font-size: 12.5px; }
section { margin-top: 28px; }
h2 { font-size: 18px; margin: 0 0 6px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 14px 0 4px; }
p.note { color: var(--muted); margin: 4px 0 10px; }
.row { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.row figure { flex: 1 1 480px; min-width: 0; }
.row figure svg { width: 100%; }
figure { margin: 6px 0; }
figure svg, figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12px; }
.scroll { max-height: 900px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.scroll svg { max-width: none; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { padding: 3px 9px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: var(--tint); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.changed td { background: #fdecea; }
tr.changed td.decision { color: var(--red); font-weight: 650; }
code, pre { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
pre { background: var(--tint); padding: 8px; border-radius: 6px; overflow: auto; }
"""
)


def _page(run: RunDir, report: dict, trajectories: ThetaTrajectories, plots: _Plots) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>fxadapt: {_escape(_model_name(report))} on {_escape(report['data'])}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        _header(report),
        _summary_cards(report),
        _verdict(report),
        _diagrams_section(run),
        _curves_section(report, plots),
        _theta_section(report, trajectories, plots),
        _edges_section(report),
        _costs_section(report),
        _epochs_section(report),
        _network_section(run),
        _details_section(report),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _pointer(*keys) -> str:
    """Returns the JSON Pointer of ``keys`` in report.json."""
    return "".join("/" + str(key).replace("~", "~0").replace("/", "~1") for key in keys)


def _value(tag: str, report: dict, keys: tuple, text: Callable, css_class: str = "") -> str:
    """Formats the report value at ``keys`` as an element tagged with its JSON Pointer.

    A value missing from the report is shown as ``-`` with no pointer.
    """
    class_attribute = f' class="{css_class}"' if css_class else ""
    value = report
    try:
        for key in keys:
            value = value[key]
    except (KeyError, IndexError, TypeError):
        return f"<{tag}{class_attribute}>-</{tag}>"
    display_text = "-" if value is None else text(value)
    return (
        f'<{tag}{class_attribute} data-report="{_escape(_pointer(*keys))}" '
        f'data-value="{_escape(json.dumps(value))}">{_escape(display_text)}</{tag}>'
    )


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def _count(value: float) -> str:
    return f"{int(value):,}"


def _mega(value: float) -> str:
    return f"{value / 1e6:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.3f}×"


def _milliseconds(value: float) -> str:
    return f"{value:.2f}"


def _model_name(report: dict) -> str:
    return str(report["model"]).rpartition(":")[2] or str(report["model"])


def _header(report: dict) -> str:
    config = report["config"]
    architecture, network = _stage_counts(report["history"])
    facts = [
        f"<code>{_escape(report['model'])}</code>",
        f"{_escape(config['wrap']['scope'])} scope",
        f"{_escape(config['wrap']['granularity'])} granularity",
        f"{architecture + network} epochs ({architecture} architecture, {network} network)",
    ]
    if config.get("train_limit"):
        facts.append(f"{config['train_limit']:,} training images")
    facts.append(f"run <code>{_escape(config['out'])}</code>")
    links = [
        ("diagrams", "Cell types"),
        ("curves", "Learning curves"),
        ("theta", "theta trajectories"),
        ("edges", "Edge decisions"),
        ("costs", "Costs"),
        ("epochs", "Epochs"),
        ("network", "Network"),
        ("details", "Run details"),
    ]
    nav = "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in links)
    return (
        '<header><div class="kicker">fxadapt run report</div>'
        f"<h1>{_escape(_model_name(report))} on {_escape(report['data'])}</h1>"
        f'<p class="facts">{" · ".join(facts)}</p><nav>{nav}</nav></header>'
    )


def _summary_cards(report: dict) -> str:
    summary = report["summary"]
    metric = _escape(report["accuracy"].get("metric") or "test accuracy")
    accuracy = (
        f'<div class="card"><div class="label">Final {metric}</div>'
        + _value("div", report, ("accuracy", "test"), _percent, "big")
        + '<div class="sub">best '
        + _value("span", report, ("accuracy", "best_test"), _percent)
        + " · train "
        + _value("span", report, ("accuracy", "train"), _percent)
        + "</div></div>"
    )
    edges = (
        f'<div class="card{" alert" if summary["changed"] else ""}">'
        '<div class="label">Edges changed</div><div class="big">'
        + _value("span", report, ("summary", "changed"), _count)
        + " of "
        + _value("span", report, ("summary", "edges"), _count)
        + '</div><div class="sub">none '
        + _value("span", report, ("summary", "none"), _count)
        + " · identity "
        + _value("span", report, ("summary", "identity"), _count)
        + " · kept by the guard "
        + _value("span", report, ("summary", "guarded"), _count)
        + "</div></div>"
    )
    cards = [accuracy, edges]
    # Latency stays in the cost table: it is measured, so it varies between runs.
    for key, label, text, unit in (
        ("parameters", "Parameters, derived / original", _count, ""),
        ("flops", "FLOPs, derived / original", _mega, " MFLOPs"),
    ):
        if key not in report["ratios"]:
            continue
        cards.append(
            f'<div class="card"><div class="label">{label}</div>'
            + _value("div", report, ("ratios", key), _ratio, "big")
            + '<div class="sub">'
            + _value("span", report, ("costs", "derived", key), text)
            + " / "
            + _value("span", report, ("costs", "original", key), text)
            + f"{unit}</div></div>"
        )
    return f'<div class="cards">{"".join(cards)}</div>'


def _verdict(report: dict) -> str:
    """Builds one sentence on what derivation did, and the changed edges as chips."""
    changed = [row for row in report["edges"] if row["changed"]]
    if not changed:
        return (
            '<p class="verdict">No edge changed: every edge kept its original operation '
            "(same), so the derived module has the original's structure.</p>"
        )
    counts = Counter(row["decision"] for row in changed)
    kinds = " and ".join(f"{count} into {decision}" for decision, count in counts.items())
    chips = "".join(
        f"<li>{_escape(row['edge'])} {_escape(row['cell'])} {_escape(row['operation'])} → "
        f"{_escape(row['decision'])}{' (guard)' if row['guarded'] else ''}</li>"
        for row in changed
    )
    return (
        f'<p class="verdict"><strong>{len(changed)} of {len(report["edges"])} edges changed'
        f'</strong>: {_escape(kinds)}.</p><ul class="chips">{chips}</ul>'
    )


def _diagrams_section(run: RunDir) -> str:
    files = _diagram_files(run, "cell-*")
    if files:
        body = f'<div class="row">{"".join(_embedded_diagram(run, path) for path in files)}</div>'
    elif list(run.path.glob(f"{RunDir.DIAGRAMS}/cell-*.dot")):
        body = (
            '<p class="note">Graphviz was missing when the run was drawn, so only the .dot '
            "sources exist: install Graphviz and run `fxadapt draw RUN`.</p>"
        )
    else:
        body = '<p class="note">The run has no diagrams: run `fxadapt draw RUN`.</p>'
    return (
        '<section id="diagrams"><h2>Cell types after derivation</h2><p class="note">'
        "Red edges changed, and dashed ones became none. Bold edges were kept by the guard.</p>"
        f"{body}</section>"
    )


def _diagram_files(run: RunDir, pattern: str) -> list[Path]:
    """Returns the rendered diagrams whose stem matches ``pattern``, an SVG where one exists.

    The folder is read rather than the report's list, so diagrams that ``fxadapt draw``
    wrote after the run are found too.
    """
    folder = run.path / RunDir.DIAGRAMS
    rendered = [*folder.glob(f"{pattern}.svg"), *folder.glob(f"{pattern}.png")]
    files = []
    for stem in sorted({path.stem for path in rendered}):
        svg = folder / f"{stem}.svg"
        files.append(svg if svg.is_file() else svg.with_suffix(".png"))
    return files


def _embedded_diagram(run: RunDir, path: Path) -> str:
    """Builds a figure with the SVG at ``path`` inlined, or its PNG as base64."""
    relative = _escape(path.relative_to(run.path).as_posix())
    caption = f"<figcaption>{relative}</figcaption>"
    if path.suffix == ".svg":
        return f'<figure data-file="{relative}">{_inline_svg(path)}{caption}</figure>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure data-file="{relative}"><img alt="{relative}" '
        f'src="data:image/png;base64,{data}">{caption}</figure>'
    )


def _inline_svg(path: Path) -> str:
    """Returns an SVG file's text from its ``<svg`` tag on, without the XML prolog."""
    text = path.read_text()
    start = text.find("<svg")
    if start < 0:
        raise FxadaptError(f"{path} is not an SVG file: run `fxadapt draw RUN` to redraw it")
    return text[start:]


def _curves_section(report: dict, plots: _Plots) -> str:
    if plots.curves_svg is not None:
        body = f'<figure class="curves">{_inline_svg(plots.curves_svg)}</figure>'
    else:
        body = _no_plot_note(plots, "the run has no epoch records")
    return f'<section id="curves"><h2>Learning curves</h2>{body}</section>'


def _no_plot_note(plots: _Plots, reason: str) -> str:
    if not plots.available:
        reason = _MISSING_MATPLOTLIB
    return f'<p class="note">No plot: {_escape(reason)}.</p>'


def _theta_section(report: dict, trajectories: ThetaTrajectories, plots: _Plots) -> str:
    scope = report["config"]["wrap"]["scope"]
    source = (
        f"sampled within epochs from {THETA_LOG}"
        if trajectories.source == THETA_LOG
        else f"once per epoch from {RunDir.METRICS}"
    )
    intro = (
        f'<p class="note">One panel per theta group ({_escape(scope)} scope), {source}. An '
        "edge turns none when every other theta falls below the dashed zero line.</p>"
    )
    figures = []
    for cell_type, svg in plots.cell_type_to_theta_svg.items():
        figures.append(
            f'<h3>{_escape(cell_type)}</h3><figure class="theta" '
            f'data-cell-type="{_escape(cell_type)}">{_inline_svg(svg)}</figure>'
        )
    body = "".join(figures) or _no_plot_note(plots, "the run has no architecture stage")
    return f'<section id="theta"><h2>theta trajectories</h2>{intro}{body}</section>'


def _edges_section(report: dict) -> str:
    head = (
        "<tr><th>edge</th><th>cell</th><th>cell type</th><th>operation</th><th>options</th>"
        '<th>theta group</th><th class="num">theta same</th>'
        '<th class="num">theta identity</th><th>decision</th></tr>'
    )
    rows = []
    for index, row in enumerate(report["edges"]):
        theta = [
            _value("td", report, ("edges", index, "theta", option), _signed, "num")
            if option in (row["theta"] or {})
            else '<td class="num">-</td>'
            for option in ("same", "identity")
        ]
        decision = _value("td", report, ("edges", index, "decision"), str, "decision")
        if row["guarded"]:
            decision = decision.replace("</td>", " (guard)</td>")
        rows.append(
            f'<tr{" class=changed" if row["changed"] else ""} data-edge="{_escape(row["edge"])}">'
            f"<td>{_escape(row['edge'])}</td><td>{_escape(row['cell'])}</td>"
            f"<td>{_escape(row['cell_type'])}</td><td>{_escape(row['operation'])}</td>"
            f"<td>{_escape(', '.join(row['options']))}</td>"
            f"<td>{_escape(row['theta_group'])}</td>{''.join(theta)}{decision}</tr>"
        )
    return (
        '<section id="edges"><h2>Edge decisions</h2><p class="note">Changed edges are '
        "highlighted. The theta columns give the values at derivation.</p>"
        f'<table class="edges"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        "</section>"
    )


def _signed(value: float) -> str:
    return f"{value:+.4f}"


def _costs_section(report: dict) -> str:
    head = (
        '<tr><th>module</th><th class="num">parameters</th><th class="num">MFLOPs</th>'
        '<th class="num">latency (ms)</th></tr>'
    )
    rows = []
    for name in report["costs"]:
        rows.append(
            f"<tr><td>{_escape(name)}</td>"
            + _value("td", report, ("costs", name, "parameters"), _count, "num")
            + _value("td", report, ("costs", name, "flops"), _mega, "num")
            + _value("td", report, ("costs", name, "latency_ms"), _milliseconds, "num")
            + "</tr>"
        )
    if report["ratios"]:
        rows.append(
            "<tr><td>derived / original</td>"
            + "".join(
                _value("td", report, ("ratios", key), _ratio, "num")
                for key in ("parameters", "flops", "latency_ms")
            )
            + "</tr>"
        )
    return (
        '<section id="costs"><h2>Costs</h2><p class="note">Costs of one forward on one image. '
        "The wrapped module includes the mixed edges and their theta. Latency is the median of "
        f"{LATENCY_ROUNDS} rounds that alternate the modules, measured at the end of the run "
        "on the machine that trained it, so compare the rows with each other rather than with "
        "other runs.</p>"
        f'<table class="costs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        "</section>"
    )


def _epochs_section(report: dict) -> str:
    columns = (
        ("train_loss", "train loss", _four),
        ("train_accuracy", "train accuracy", _percent),
        ("test_loss", "test loss", _four),
        ("test_accuracy", "test accuracy", _percent),
        ("lr", "lr", _general),
        ("arch_lr", "theta lr", _general),
        ("images_per_second", "images/s", _whole),
        ("seconds", "seconds", _two),
    )
    head = (
        "<tr><th>epoch</th><th>stage</th>"
        + "".join(f'<th class="num">{label}</th>' for _, label, _ in columns)
        + "</tr>"
    )
    rows = []
    for index, record in enumerate(report["history"]):
        cells = "".join(
            _value("td", report, ("history", index, key), text, "num") for key, _, text in columns
        )
        rows.append(
            f"<tr><td>{record['epoch']}</td><td>{_escape(record['stage'])}</td>{cells}</tr>"
        )
    return (
        '<section id="epochs"><h2>Epochs</h2>'
        f'<table class="epochs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
        "</table></section>"
    )


def _four(value: float) -> str:
    return f"{value:.4f}"


def _two(value: float) -> str:
    return f"{value:.2f}"


def _whole(value: float) -> str:
    return f"{value:,.0f}"


def _general(value: float) -> str:
    return f"{value:.4g}"


def _network_section(run: RunDir) -> str:
    files = _diagram_files(run, "network")
    if not files:
        return ""
    return (
        '<section id="network"><h2>Network</h2><p class="note">Every operation, grouped by '
        'cell, with changed edges in red.</p><div class="scroll">'
        f"{_embedded_diagram(run, files[0])}</div></section>"
    )


def _details_section(report: dict) -> str:
    parts = ['<section id="details"><h2>Run details</h2>']
    if report["exports"]:
        items = "".join(
            f"<li>{_escape(format)}: <code>{_escape(name)}</code></li>"
            for format, name in report["exports"].items()
        )
        parts.append(f"<h3>Exports</h3><ul>{items}</ul>")
    if report["leaves"]:
        items = "".join(
            f"<li><code>{_escape(path)}</code>: {_escape(reason)}</li>"
            for path, reason in report["leaves"].items()
        )
        parts.append(f"<h3>Modules traced as leaves</h3><ul>{items}</ul>")
    config = json.dumps(report["config"], indent=2)
    parts.append(f"<h3>Configuration</h3><pre>{_escape(config)}</pre></section>")
    return "".join(parts)
