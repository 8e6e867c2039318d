"""Tests of the cell-type and network diagrams: colours, dashes, files and a missing ``dot``."""

import copy
import logging
import re
import shutil
import xml.etree.ElementTree as ElementTree

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxadapt.api as api
from fxadapt import draw
from fxadapt.edges import EdgeTable

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is missing")

_SVG = "{http://www.w3.org/2000/svg}"
_NODE_LINE = re.compile(r"^\s*(\w+) \[(.*)\]$")
_ARROW_LINE = re.compile(r"^\s*(\w+) -> (\w+)(?: \[(.*)\])?$")


class _Block(nn.Module):
    """A CIFAR-style basic block whose shortcut subsamples and pads x when the stride is 2."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            half = self.extra_channels // 2
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, half, half))
        return F.relu(out + shortcut)


class _TinyResNet(nn.Module):
    """Five blocks: four keep their shape (one cell type) and one downsamples (another)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.blocks = nn.Sequential(
            _Block(8, 8, 1), _Block(8, 8, 1), _Block(8, 8, 1), _Block(8, 16, 2), _Block(16, 16, 1)
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.blocks(x)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def networks():
    """Returns the wrapped network, its table, and the derived network with its table.

    In the derived network, e0 (the residual branch of blocks.0) is decided identity and e3
    (the shortcut of blocks.1) is decided none.
    """
    torch.manual_seed(0)
    wrapped = api.wrap(_TinyResNet(), torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        wrapped.fxadapt_mixed.e0.theta_same.fill_(-1.0)
        wrapped.fxadapt_mixed.e0.theta_identity.fill_(0.5)
        wrapped.fxadapt_mixed.e3.theta_same.fill_(-1.0)
    derived = api.derive(wrapped)
    return {
        "wrapped": wrapped,
        "table": copy.deepcopy(api.edge_table(wrapped)),
        "derived": derived,
        "decided": api.edge_table(derived),
    }


def _dot_nodes(text: str) -> dict[str, str]:
    """Returns node name to its attribute text for every node line of a .dot source."""
    nodes = {}
    for line in text.splitlines():
        match = _NODE_LINE.match(line)
        if match and match.group(1) not in ("node", "edge", "graph"):
            nodes[match.group(1)] = match.group(2)
    return nodes


def _dot_arrows(text: str) -> list[tuple[str, str, str]]:
    """Returns (source, target, attribute text) for every arrow of a .dot source."""
    arrows = []
    for line in text.splitlines():
        match = _ARROW_LINE.match(line)
        if match:
            arrows.append((match.group(1), match.group(2), match.group(3) or ""))
    return arrows


def _svg_arrow_strokes(path) -> list[tuple[str, bool]]:
    """Returns (stroke colour, dashed) of the line of every arrow in an SVG from Graphviz."""
    strokes = []
    for group in ElementTree.parse(path).iter(f"{_SVG}g"):
        if group.get("class") != "edge":
            continue
        line = group.find(f"{_SVG}path")
        strokes.append((line.get("stroke"), line.get("stroke-dasharray") is not None))
    return strokes


def _changed_positions(table: EdgeTable, cell_type: str) -> set[int]:
    return {edge.position for edge in table.edges if edge.cell_type == cell_type and edge.changed}


def test_cell_types_one_file_each(networks, tmp_path):
    decided = networks["decided"]
    paths = draw.draw_cell_types(decided, tmp_path, formats=())

    assert set(decided.cell_types) == {"_Block-1", "_Block-2"}
    assert sorted(path.name for path in paths) == ["cell-_Block-1.dot", "cell-_Block-2.dot"]
    for path in paths:
        assert path.exists()


@needs_dot
def test_cell_types_render_svg_and_png(networks, tmp_path):
    paths = draw.draw_cell_types(networks["decided"], tmp_path)

    names = {path.name for path in paths}
    assert names == {
        f"cell-_Block-{index}.{suffix}" for index in (1, 2) for suffix in ("dot", "svg", "png")
    }
    for path in paths:
        assert path.stat().st_size > 0


@needs_dot
def test_cell_svg_red_on_changed_edges_only(networks, tmp_path):
    decided = networks["decided"]
    draw.draw_cell_types(decided, tmp_path, formats=("svg",))

    block = _svg_arrow_strokes(tmp_path / "cell-_Block-1.svg")
    downsampling = _svg_arrow_strokes(tmp_path / "cell-_Block-2.svg")
    assert len(_changed_positions(decided, "_Block-1")) == 2
    assert sum(stroke == draw.RED for stroke, _ in block) == 2
    assert [dashed for stroke, dashed in block if stroke == draw.RED].count(True) == 1
    assert len(downsampling) == 2
    assert all(stroke != draw.RED for stroke, _ in downsampling)


def test_cell_dot_labels_aggregate_decisions(networks, tmp_path):
    draw.draw_cell_types(networks["decided"], tmp_path, formats=())
    arrows = _dot_arrows((tmp_path / "cell-_Block-1.dot").read_text())

    assert len(arrows) == 2
    branch, shortcut = (attributes for _, _, attributes in arrows)
    assert "conv(3x3)·bn·relu·conv(3x3)·" in branch
    assert "identity in 1 (blocks.0) of 4 cells" in branch
    assert "style=dashed" not in branch
    assert "skip" in shortcut
    assert "none in 1 (blocks.1) of 4 cells" in shortcut
    assert "style=dashed" in shortcut


def test_cell_scope_none_in_all_cells(tmp_path):
    wrapped = api.wrap(_TinyResNet(), torch.randn(2, 3, 8, 8), scope="cell")
    with torch.no_grad():
        wrapped.fxadapt_mixed.get_submodule("_Block_1_p1").theta_same.fill_(-0.25)
    decided = api.edge_table(api.derive(wrapped))
    draw.draw_cell_types(decided, tmp_path, formats=())

    shortcut = _dot_arrows((tmp_path / "cell-_Block-1.dot").read_text())[1][2]
    assert "none in all 4 cells" in shortcut
    assert "θ: same -0.25, none 0.00" in shortcut
    assert draw.RED in shortcut
    assert "style=dashed" in shortcut


def test_guarded_edge_is_bold(tmp_path):
    wrapped = api.wrap(_TinyResNet(), torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        wrapped.fxadapt_mixed.e0.theta_same.fill_(-1.0)
        wrapped.fxadapt_mixed.e0.theta_identity.fill_(-0.5)
        wrapped.fxadapt_mixed.e1.theta_same.fill_(-0.2)
    decided = api.edge_table(api.derive(wrapped))
    draw.draw_cell_types(decided, tmp_path, formats=())

    assert [edge.name for edge in decided.edges if edge.guarded] == ["e1"]
    branch, shortcut = _dot_arrows((tmp_path / "cell-_Block-1.dot").read_text())
    assert "kept by the guard in 1 of 4 cells" in shortcut[2]
    assert "bold" in shortcut[2]
    assert "bold" not in branch[2]
    assert "style=dashed" in branch[2]


def test_supernet_has_no_red(networks, tmp_path):
    paths = draw.draw_cell_types(networks["table"], tmp_path, formats=())
    paths += draw.draw_network(networks["wrapped"], networks["table"], tmp_path, formats=())

    for path in paths:
        assert draw.RED not in path.read_text(), path.name
    block = (tmp_path / "cell-_Block-1.dot").read_text()
    assert "options: same, identity, none" in block
    assert "options: same, none" in block


@needs_dot
def test_supernet_svg_has_no_red(networks, tmp_path):
    draw.draw_cell_types(networks["table"], tmp_path, formats=("svg",))

    for path in tmp_path.glob("*.svg"):
        strokes = _svg_arrow_strokes(path)
        assert strokes
        assert all(stroke != draw.RED for stroke, _ in strokes)


def test_network_mentions_every_cell(networks, tmp_path):
    decided = networks["decided"]
    (path,) = draw.draw_network(networks["wrapped"], decided, tmp_path, formats=())
    text = path.read_text()

    cells = [cell for cells in decided.cell_types.values() for cell in cells]
    assert len(cells) == 5
    for cell_type, cells in decided.cell_types.items():
        for cell in cells:
            assert f'label="{cell} ({cell_type})"' in text


def test_network_red_on_changed_edges(networks, tmp_path):
    decided = networks["decided"]
    (path,) = draw.draw_network(networks["wrapped"], decided, tmp_path, formats=())
    text = path.read_text()

    nodes = _dot_nodes(text)
    red_nodes = {name for name, attributes in nodes.items() if draw.RED in attributes}
    dashed_nodes = {name for name, attributes in nodes.items() if "dashed" in attributes}
    identity_edge = decided.edges[0]
    assert identity_edge.decision == "identity"
    assert red_nodes == {*identity_edge.nodes, "fxadapt_mixed_e0", "fxadapt_mixed_e3"}
    assert dashed_nodes == {"fxadapt_mixed_e3"}

    red_arrows = {
        (source, target)
        for source, target, attributes in _dot_arrows(text)
        if draw.RED in attributes
    }
    branch = [identity_edge.entry, *identity_edge.nodes, "fxadapt_mixed_e0", "add"]
    assert red_arrows == {
        *zip(branch, branch[1:], strict=False),
        ("relu", "fxadapt_mixed_e0"),
        ("relu_2", "fxadapt_mixed_e3"),
        ("fxadapt_mixed_e3", "add_1"),
    }
    assert "get_attr" not in text


def test_network_of_derived_shows_removed_edge(networks, tmp_path):
    decided = networks["decided"]
    (path,) = draw.draw_network(networks["derived"], decided, tmp_path, formats=())
    text = path.read_text()

    nodes = _dot_nodes(text)
    assert "blocks_0_conv1" not in nodes
    assert "fxadapt_removed_e3" in nodes
    assert draw.RED in nodes["fxadapt_removed_e3"]
    assert "dashed" in nodes["fxadapt_removed_e3"]
    # The identity's theta is folded into the add (alpha), so e0 leaves no node either.
    assert "dashed" not in nodes["fxadapt_removed_e0"]
    red_nodes = {name for name, attributes in nodes.items() if draw.RED in attributes}
    assert red_nodes == {"fxadapt_removed_e0", "fxadapt_removed_e3"}


def test_drawing_leaves_inputs_unchanged(networks, tmp_path):
    decided = networks["decided"]
    table_before = copy.deepcopy(decided.to_dict())
    code_before = networks["derived"].code

    draw.draw_cell_types(decided, tmp_path, formats=())
    draw.draw_network(networks["derived"], decided, tmp_path, formats=())

    assert decided.to_dict() == table_before
    assert networks["derived"].code == code_before


def test_missing_dot_writes_dot_and_hint(networks, tmp_path, monkeypatch, caplog):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(draw, "_missing_dot_warned", False)

    with caplog.at_level(logging.WARNING, logger="fxadapt.draw"):
        cell_paths = draw.draw_cell_types(networks["decided"], tmp_path / "out")
        network_paths = draw.draw_network(
            networks["wrapped"], networks["decided"], tmp_path / "out"
        )

    assert [path.suffix for path in cell_paths] == [".dot", ".dot"]
    assert [path.name for path in network_paths] == ["network.dot"]
    assert sorted(path.suffix for path in (tmp_path / "out").iterdir()) == [".dot"] * 3
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "apt-get install graphviz" in message
    assert "brew install graphviz" in message
    assert "https://graphviz.org/download/" in message


def test_render_rejects_unknown_format(networks, tmp_path):
    with pytest.raises(ValueError, match="'svgz2'"):
        draw.draw_cell_types(networks["decided"], tmp_path, formats=("svgz2",))
    assert not list(tmp_path.iterdir())


def test_render_rejects_non_graph(tmp_path):
    with pytest.raises(TypeError, match="graphviz.Digraph"):
        draw.render("digraph {}", tmp_path / "graph", ("svg",))


@pytest.mark.parametrize(
    ("ops", "label"),
    [
        ([], "skip"),
        (["Conv2d", "BatchNorm2d", "relu", "Conv2d", "BatchNorm2d"], "conv·bn·relu·conv·bn"),
        (["Conv2d(5x5,dw)", "BatchNorm2d"], "conv(5x5,dw)·bn"),
        (["ReLU", "Conv2d", "Conv2d", "BatchNorm2d"], "relu·conv×2·bn"),
        (["getitem", "pad"], "getitem·pad"),
        (["adaptive_avg_pool2d", "Linear"], "avgpool·linear"),
        (["SubsamplePad", "ReLU6"], "SubsamplePad·relu6"),
    ],
)
def test_short_ops_labels(ops, label):
    assert draw.short_ops(ops) == label


def test_short_ops_wraps_long_chain():
    label = draw.short_ops(["ReLU", "Conv2d", "BatchNorm2d"] * 4)

    lines = label.split("\n")
    assert len(lines) > 1
    assert all(len(line) <= 29 for line in lines)
    assert label.replace("\n", "").count("conv") == 4
