"""The run report: every edge with its options, theta and decision, the costs and the accuracy.

The same content is written as ``report.json`` (for scripts), ``report.md`` (for people) and
shown by the CLI as rich tables.
"""

from __future__ import annotations

from rich.table import Table

from fxadapt.costs import LATENCY_ROUNDS
from fxadapt.edges import EdgeTable
from fxadapt.rundir import RunDir

__all__ = ["build_report", "write_report", "edge_rows", "edge_table_view", "cost_table_view"]

_EDGE_COLUMNS = ("edge", "cell", "cell type", "operation", "options", "theta", "decision")

# Short names of common operations, so that an edge's operation fits in a table cell.
_SHORT_OPS = {
    "Conv1d": "conv",
    "Conv2d": "conv",
    "Conv3d": "conv",
    "BatchNorm1d": "bn",
    "BatchNorm2d": "bn",
    "BatchNorm3d": "bn",
    "LayerNorm": "ln",
    "Linear": "linear",
    "ReLU": "relu",
    "ReLU6": "relu6",
    "hardtanh": "relu6",
    "getitem": "slice",
    "adaptive_avg_pool2d": "avgpool",
    "AdaptiveAvgPool2d": "avgpool",
    "MaxPool2d": "maxpool",
    "AvgPool2d": "avgpool",
}


def build_report(
    *,
    table: EdgeTable,
    costs: dict[str, dict[str, float]],
    history: list[dict],
    config: dict,
    exports: dict[str, str],
    diagrams: list[str],
    metric: str = "test accuracy",
    exported: str | None = None,
) -> dict:
    """Returns the report of a finished run as plain data.

    ``metric`` names what ``test_accuracy`` measured (a kNN accuracy for a self-supervised
    run), and ``exported`` describes what the exported module outputs.
    """
    final = history[-1] if history else {}
    changed = [edge for edge in table.edges if edge.changed]
    return {
        "model": table.model,
        "data": config.get("data"),
        "accuracy": {
            "test": final.get("test_accuracy"),
            "best_test": max((record["test_accuracy"] for record in history), default=None),
            "train": final.get("train_accuracy"),
            "metric": metric,
        },
        "edges": edge_rows(table),
        "summary": {
            "edges": len(table.edges),
            "theta_groups": len(table.theta_groups()),
            "changed": len(changed),
            "none": sum(edge.decision == "none" for edge in changed),
            "identity": sum(edge.decision == "identity" for edge in changed),
            "guarded": sum(edge.guarded for edge in table.edges),
            "cell_types": {name: len(cells) for name, cells in table.cell_types.items()},
        },
        "leaves": table.leaves,
        "costs": costs,
        "ratios": _ratios(costs),
        "history": history,
        "exports": exports,
        "exported": exported,
        "diagrams": diagrams,
        "config": config,
    }


def write_report(run: RunDir, report: dict) -> None:
    """Writes ``report.json`` and ``report.md`` into the run directory."""
    run.write_json(RunDir.REPORT_JSON, report)
    run.write_text(RunDir.REPORT_MD, _markdown(report))


def edge_rows(table: EdgeTable) -> list[dict]:
    """Returns one plain row per edge: its place, operation, options, theta and decision."""
    return [
        {
            "edge": edge.name,
            "cell": edge.cell or "(root)",
            "cell_type": edge.cell_type,
            "operation": "new shortcut" if edge.shortcut else _operation(edge.ops),
            "options": edge.options,
            "theta_group": edge.theta,
            "theta": edge.theta_values,
            "decision": edge.decision,
            "guarded": edge.guarded,
        }
        for edge in table.edges
    ]


def edge_table_view(table: EdgeTable, title: str = "Edges") -> Table:
    """Returns a rich table of the edges, changed decisions in red."""
    view = Table(title=title, title_justify="left")
    for column in _EDGE_COLUMNS:
        view.add_column(column, no_wrap=column not in ("operation", "cell"))
    for row in edge_rows(table):
        decision = row["decision"] or "-"
        if row["guarded"]:
            decision += " (guard)"
        if row["decision"] not in (None, "same"):
            decision = f"[red]{decision}[/red]"
        view.add_row(
            row["edge"],
            row["cell"],
            row["cell_type"],
            row["operation"],
            "/".join(option[0] for option in row["options"]),
            _theta_text(row["theta"]),
            decision,
        )
    view.caption = "options: s same, i identity, n none; theta per option"
    return view


# Text under the cost table of the console and of report.md, on reading its latency column.
LATENCY_CAPTION = (
    f"Latency: median of {LATENCY_ROUNDS} alternating rounds on this machine under its load "
    "at the time. Compare the rows with each other, not with other runs."
)


def cost_table_view(costs: dict[str, dict[str, float]]) -> Table:
    """Returns a rich table of parameters, FLOPs and latency per module."""
    view = Table(
        title="Costs (batch of 1)",
        title_justify="left",
        caption=LATENCY_CAPTION,
        caption_justify="left",
    )
    for column in ("module", "parameters", "MFLOPs", "latency (ms)"):
        view.add_column(column, justify="left" if column == "module" else "right")
    for name, values in costs.items():
        latency = values.get("latency_ms")
        view.add_row(
            name,
            f"{int(values['parameters']):,}",
            f"{values['flops'] / 1e6:.2f}",
            "-" if latency is None else f"{latency:.2f}",
        )
    return view


def _ratios(costs: dict[str, dict[str, float]]) -> dict[str, float]:
    original, derived = costs.get("original"), costs.get("derived")
    if not original or not derived:
        return {}
    return {
        key: derived[key] / original[key]
        for key in ("parameters", "flops", "latency_ms")
        if original.get(key) and key in derived
    }


def _operation(ops: list[str]) -> str:
    """Returns an edge's operation in short words, such as ``conv·bn·relu·conv·bn``."""
    if not ops:
        return "skip"
    words = []
    for op in ops:
        base, _, details = op.partition("(")
        words.append(_SHORT_OPS.get(base, base) + (f"({details}" if details else ""))
    return "·".join(words)


def _theta_text(theta: dict[str, float] | None) -> str:
    if not theta:
        return "-"
    return " ".join(
        f"{option[0]}{value:+.2f}" for option, value in theta.items() if option != "none"
    )


def _markdown(report: dict) -> str:
    accuracy = report["accuracy"]
    summary = report["summary"]
    lines = [
        f"# fxadapt run: {report['model']} on {report['data']}",
        "",
        f"{_metric_label(accuracy)}: {_percent(accuracy['test'])} "
        f"(best {_percent(accuracy['best_test'])}); "
        f"train accuracy {_percent(accuracy['train'])}.",
        "",
        f"{summary['edges']} edges in {summary['theta_groups']} theta groups; "
        f"{summary['changed']} changed ({summary['none']} none, {summary['identity']} "
        f"identity); {summary['guarded']} kept by the guard.",
        "",
        "## Costs (batch of 1)",
        "",
        "| module | parameters | MFLOPs | latency (ms) |",
        "|---|---:|---:|---:|",
    ]
    for name, values in report["costs"].items():
        latency = values.get("latency_ms")
        lines.append(
            f"| {name} | {int(values['parameters']):,} | {values['flops'] / 1e6:.2f} | "
            f"{'-' if latency is None else f'{latency:.2f}'} |"
        )
    lines += ["", LATENCY_CAPTION]
    lines += ["", "## Edges", "", "| " + " | ".join(_EDGE_COLUMNS) + " |"]
    lines.append("|" + "---|" * len(_EDGE_COLUMNS))
    for row in report["edges"]:
        decision = (row["decision"] or "-") + (" (guard)" if row["guarded"] else "")
        if row["decision"] not in (None, "same"):
            decision = f"**{decision}**"
        cells = [
            row["edge"],
            row["cell"],
            row["cell_type"],
            row["operation"],
            ", ".join(row["options"]),
            _theta_text(row["theta"]),
            decision,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report["leaves"]:
        lines += ["", "## Leaves", "", "| module | reason |", "|---|---|"]
        lines += [f"| {path} | {reason} |" for path, reason in report["leaves"].items()]
    if report["history"]:
        lines += [
            "",
            "## Epochs",
            "",
            "| epoch | stage | train loss | train acc. | test acc. | lr | images/s |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for record in report["history"]:
            lines.append(
                f"| {record['epoch']} | {record['stage']} | {record['train_loss']:.4f} | "
                f"{_percent(record['train_accuracy'])} | {_percent(record['test_accuracy'])} | "
                f"{record['lr']:.4g} | {record['images_per_second']:.0f} |"
            )
    if report["diagrams"]:
        lines += ["", "## Diagrams", ""]
        lines += [f"![{path}]({path})" for path in report["diagrams"] if path.endswith(".svg")]
    if report["exports"]:
        lines += ["", "## Exports", ""]
        lines += [f"- {format}: `{name}`" for format, name in report["exports"].items()]
        if report.get("exported"):
            lines += ["", f"The exported module outputs {report['exported']}."]
    return "\n".join(lines) + "\n"


def _metric_label(accuracy: dict) -> str:
    metric = accuracy.get("metric") or "test accuracy"
    # Capitalise a plain word ("test"), but keep an abbreviation such as "kNN" as written.
    if metric[1:2].islower():
        return metric[:1].upper() + metric[1:]
    return metric


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
