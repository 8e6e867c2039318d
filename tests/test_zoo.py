"""Every network of the zoo, in both scopes, through the whole chain.

wrap → equals the original at init → one alternating step → derive with hand-set theta →
export to TorchScript → the exported outputs equal the derived module's.
"""

import copy
import random

import pytest
import torch

import fxadapt
from fxadapt.export import load_exported
from fxadapt.models import DARTS, MobileNetV2, ProxylessNAS, ResNet20, ResNet50

from conftest import randomize_batchnorm

ZOO = {
    "ResNet20": lambda: ResNet20(),
    "MobileNetV2": lambda: MobileNetV2(),
    "DARTS": lambda: DARTS(C=8, layers=6),
    "ProxylessNAS": lambda: ProxylessNAS(),
    "ResNet50": lambda: ResNet50(),
}

# theta that make each option win: (theta_same, theta_identity)
OPTION_TO_THETA = {"same": (1.0, -0.5), "identity": (-0.5, 0.8), "none": (-0.3, -0.6)}


def _hand_set_theta(wrapped, seed: int) -> None:
    chooser = random.Random(seed)
    table = fxadapt.edge_table(wrapped)
    with torch.no_grad():
        for theta_name, edges in table.theta_groups().items():
            module = wrapped.fxadapt_mixed[theta_name]
            option = chooser.choice(edges[0].options)
            same, identity = OPTION_TO_THETA[option]
            if module.has_same:
                module.theta_same.fill_(same)
            if module.has_identity:
                module.theta_identity.fill_(identity if module.has_same else 0.5)


def _one_alternating_step(wrapped, example, labels) -> None:
    criterion = torch.nn.CrossEntropyLoss()
    weights = torch.optim.SGD(fxadapt.weight_parameters(wrapped), lr=0.01)
    thetas = torch.optim.Adam(fxadapt.arch_parameters(wrapped), lr=0.01)
    wrapped.train()
    weights.zero_grad()
    criterion(wrapped(example), labels).backward()
    weights.step()
    thetas.zero_grad()
    criterion(wrapped(example), labels).backward()
    thetas.step()
    wrapped.eval()


@pytest.mark.parametrize("scope", ["full", "cell"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_chain(name, scope, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(ZOO[name]()).eval()
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 7])
    wrapped = fxadapt.wrap(model, example, scope=scope).eval()

    with torch.no_grad():
        assert torch.equal(wrapped(example), model(example))

    _one_alternating_step(wrapped, example, labels)
    _hand_set_theta(wrapped, seed=len(name))
    derived = fxadapt.derive(wrapped).eval()
    table = fxadapt.edge_table(derived)
    reference = copy.deepcopy(wrapped)
    with torch.no_grad():
        for edge in table.edges:
            for option in edge.options:
                if option not in (edge.decision, "none"):
                    getattr(reference.fxadapt_mixed[edge.theta], f"theta_{option}").fill_(0.0)
        assert torch.allclose(derived(example), reference(example), atol=1e-4, rtol=1e-4)

    path = fxadapt.export(derived, tmp_path / "model.ts", example)
    with torch.no_grad():
        assert torch.allclose(load_exported(path)(example), derived(example), atol=1e-5)
    assert any(edge.changed for edge in table.edges)
    original_parameters = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in derived.parameters()) <= original_parameters


@pytest.mark.parametrize("name", ["ResNet20", "DARTS", "MobileNetV2"])
def test_cell_scope_decides_alike_in_every_cell(name):
    model = ZOO[name]().eval()
    wrapped = fxadapt.wrap(model, torch.randn(2, 3, 32, 32), scope="cell")
    _hand_set_theta(wrapped, seed=3)
    table = fxadapt.edge_table(fxadapt.derive(wrapped))

    for cell_type in table.cell_types:
        edges = [edge for edge in table.edges if edge.cell_type == cell_type]
        position_to_decisions = {}
        for edge in edges:
            if not edge.guarded:
                position_to_decisions.setdefault(edge.position, set()).add(edge.decision)
        assert all(len(decisions) == 1 for decisions in position_to_decisions.values())


def test_proxylessnas_works_in_cell_scope():
    wrapped = fxadapt.wrap(ProxylessNAS(), torch.randn(2, 3, 32, 32), scope="cell")
    table = fxadapt.edge_table(wrapped)

    assert len(table.cell_types) > 1
    assert len(table.theta_groups()) < len(table.edges)
