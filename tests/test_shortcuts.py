"""New shortcuts start as an exact zero and can be derived into an identity."""

import copy

import torch

import fxadapt
from fxadapt.models import ResNet20

from conftest import randomize_batchnorm


def _wrapped():
    torch.manual_seed(0)
    model = randomize_batchnorm(ResNet20()).eval()
    return model, fxadapt.wrap(model, torch.randn(2, 3, 32, 32), shortcuts=True).eval()


def test_shortcut_starts_as_exact_zero():
    model, wrapped = _wrapped()
    example = torch.randn(3, 3, 32, 32)

    with torch.no_grad():
        assert torch.equal(wrapped(example), model(example))
    assert all(
        wrapped.fxadapt_mixed[edge.theta].theta() == {"identity": 0.0, "none": 0.0}
        for edge in fxadapt.edge_table(wrapped).edges
        if edge.shortcut
    )


def test_untrained_shortcut_derives_to_none():
    _, wrapped = _wrapped()
    table = fxadapt.edge_table(fxadapt.derive(wrapped))

    assert all(edge.decision == "none" for edge in table.edges if edge.shortcut)


def test_shortcut_derives_into_identity():
    _, wrapped = _wrapped()
    shortcut = next(edge for edge in fxadapt.edge_table(wrapped).edges if edge.shortcut)
    with torch.no_grad():
        wrapped.fxadapt_mixed[shortcut.theta].theta_identity.fill_(0.25)
    derived = fxadapt.derive(wrapped).eval()
    decided = fxadapt.edge_table(derived).edges[shortcut.id]
    example = torch.randn(3, 3, 32, 32)

    with torch.no_grad():
        difference = (derived(example) - wrapped(example)).abs().max().item()

    assert decided.decision == "identity"
    assert difference <= 1e-5
    assert any(
        node.target is torch.add and node.kwargs.get("alpha") == 0.25
        for node in derived.graph.nodes
    )


def test_identity_shortcut_changes_the_output():
    model, wrapped = _wrapped()
    shortcut = next(edge for edge in fxadapt.edge_table(wrapped).edges if edge.shortcut)
    reference = copy.deepcopy(wrapped)
    with torch.no_grad():
        wrapped.fxadapt_mixed[shortcut.theta].theta_identity.fill_(0.25)
    example = torch.randn(3, 3, 32, 32)

    with torch.no_grad():
        assert not torch.allclose(wrapped(example), reference(example))
