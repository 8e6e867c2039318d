"""The guard keeps every merge alive, and the reachability check catches a dead output."""

import pytest
import torch

import fxadapt
from fxadapt.errors import FxadaptError
from fxadapt.passes import check_reachability

from conftest import TwoBranch


def _all_none(example_input, same_branch, same_shortcut):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    with torch.no_grad():
        wrapped.fxadapt_mixed["e0"].theta_same.fill_(same_branch)
        wrapped.fxadapt_mixed["e0"].theta_identity.fill_(-1.0)
        wrapped.fxadapt_mixed["e1"].theta_same.fill_(same_shortcut)
    return wrapped


def test_guard_keeps_one_merge_input(example_input):
    derived = fxadapt.derive(_all_none(example_input, -0.2, -0.5))
    table = fxadapt.edge_table(derived)

    assert table.edges[0].decision == "same"
    assert table.edges[0].guarded
    assert table.edges[1].decision == "none"
    assert not table.edges[1].guarded


def test_guard_picks_the_strongest_input(example_input):
    derived = fxadapt.derive(_all_none(example_input, -0.5, -0.2))
    table = fxadapt.edge_table(derived)

    assert table.edges[1].decision == "same"
    assert table.edges[1].guarded
    assert table.edges[0].decision == "none"


def test_guarded_output_still_depends_on_input(example_input):
    derived = fxadapt.derive(_all_none(example_input, -0.2, -0.5)).eval()
    changed = example_input.clone()
    changed[0] += 1.0

    with torch.no_grad():
        assert not torch.allclose(derived(example_input)[0], derived(changed)[0])


def test_guard_warns_with_the_merge(example_input, caplog):
    with caplog.at_level("WARNING"):
        fxadapt.derive(_all_none(example_input, -0.2, -0.5))

    assert "every input of merge" in caplog.text
    assert "e0" in caplog.text


class Disconnected(torch.nn.Module):
    def forward(self, x, y):
        return x * 2, y + 1


def test_reachability_names_the_lost_input():
    reference = torch.fx.symbolic_trace(Disconnected())
    broken = torch.fx.symbolic_trace(Disconnected())
    output = next(node for node in broken.graph.nodes if node.op == "output")
    x = next(node for node in broken.graph.nodes if node.name == "x")
    with broken.graph.inserting_before(output):
        constant = broken.graph.call_function(torch.zeros, (2,))
    output.args = ((x, constant),)
    broken.graph.eliminate_dead_code()
    broken.recompile()

    with pytest.raises(FxadaptError, match="output 1 no longer depends on input y"):
        check_reachability(broken, reference)
    check_reachability(reference, reference)


def test_guard_applies_to_given_decisions(example_input):
    wrapped = fxadapt.wrap(TwoBranch(), example_input)
    table = fxadapt.edge_table(fxadapt.derive(wrapped, {0: "none", 1: "none"}))

    assert [edge.decision for edge in table.edges] == ["same", "none"]
    assert table.edges[0].guarded
