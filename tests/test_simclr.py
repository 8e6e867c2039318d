"""Self-supervised adaptation: NT-Xent, the kNN monitor, the backbone pass and SimCLR runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.cli import main
from fxadapt.export import load_exported
from fxadapt.models import DARTS, ResNet20, ResNet50
from fxadapt.passes import FeatureNodeError, cut_backbone
from fxadapt.simclr import SimCLR, TwoViews, knn_accuracy, nt_xent, simclr_augmentation
from fxadapt.tracing import trace
from fxadapt.trainer import TrainConfig, Trainer

from conftest import randomize_batchnorm

REPO = Path(__file__).resolve().parents[1]
RESNET20 = f"{REPO / 'models' / 'resnet20.py'}:ResNet20"


def _backbone(model: nn.Module) -> torch.fx.GraphModule:
    return cut_backbone(trace(model).graph_module)


# NT-Xent


def test_nt_xent_matches_hand_computation():
    first = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 3.0]]
    second = [[0.9, 0.1, 0.0], [0.1, 1.0, 0.2], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    temperature = 0.5

    views = [np.array(vector) / np.linalg.norm(vector) for vector in first + second]
    pairs = len(first)
    total = 0.0
    for anchor in range(2 * pairs):
        partner = (anchor + pairs) % (2 * pairs)
        denominator = 0.0
        for other in range(2 * pairs):
            if other != anchor:
                denominator += math.exp(float(views[anchor] @ views[other]) / temperature)
        numerator = math.exp(float(views[anchor] @ views[partner]) / temperature)
        total += -math.log(numerator / denominator)
    expected = total / (2 * pairs)

    loss = nt_xent(torch.tensor(first), torch.tensor(second), temperature)

    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_lower_for_matching_views():
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(8, 16, generator=generator)
    unrelated = torch.randn(8, 16, generator=generator)

    assert nt_xent(first, first.clone()) < nt_xent(first, unrelated)


def test_nt_xent_rejects_a_single_pair():
    with pytest.raises(ValueError, match="at least 2 pairs"):
        nt_xent(torch.randn(1, 3), torch.randn(1, 3))


# kNN monitor


def _clusters(num_classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns tight clusters around orthogonal directions, one per class, with their labels."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes) * 10
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    features = centres[labels] + torch.randn(len(labels), num_classes, generator=generator)
    return features, labels


def test_knn_separated_clusters_reach_full_accuracy():
    bank, bank_labels = _clusters(10, 100, seed=0)
    queries, query_labels = _clusters(10, 20, seed=1)

    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, k=200, temperature=0.1)

    assert accuracy == 1.0


def test_knn_shuffled_labels_give_chance():
    bank, bank_labels = _clusters(10, 100, seed=0)
    queries, query_labels = _clusters(10, 100, seed=1)
    shuffled = bank_labels[
        torch.randperm(len(bank_labels), generator=torch.Generator().manual_seed(2))
    ]

    accuracy = knn_accuracy(bank, shuffled, queries, query_labels, k=200, temperature=0.1)

    assert abs(accuracy - 0.1) < 0.05


def test_knn_bank_smaller_than_k_votes_whole_bank():
    bank, bank_labels = _clusters(2, 3, seed=0)
    queries, query_labels = _clusters(2, 4, seed=1)

    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, k=200)

    assert accuracy == 1.0


# Augmentation


def test_two_views_differ_and_are_normalised():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    transform = simclr_augmentation((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dataset = TwoViews(images, torch.arange(4), transform)

    torch.manual_seed(0)
    (first, second), label = dataset[1]

    assert first.shape == (3, 32, 32)
    assert first.dtype == torch.float32
    assert not torch.equal(first, second)
    assert label == 1


# Backbone pass


def test_backbone_cuts_resnet20_at_pre_fc_features():
    model = randomize_batchnorm(ResNet20()).eval()
    captured = {}
    model.fc.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    example = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    traced = trace(model).graph_module

    backbone = cut_backbone(traced)
    backbone.graph.lint()
    with torch.no_grad():
        features = backbone(example)
        model(example)

    assert features.shape == (3, 64)
    torch.testing.assert_close(features, captured["x"])
    assert not hasattr(backbone, "fc")
    assert type(backbone).__name__ == "ResNet20"


def test_backbone_leaves_its_input_unchanged():
    traced = trace(ResNet20().eval()).graph_module
    nodes_before = [node.name for node in traced.graph.nodes]

    cut_backbone(traced)

    assert [node.name for node in traced.graph.nodes] == nodes_before
    assert hasattr(traced, "fc")
    assert traced(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_backbone_cuts_at_named_node():
    traced = trace(ResNet20().eval()).graph_module

    backbone = cut_backbone(traced, "layer3_2_relu2")

    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64, 8, 8)
    assert not hasattr(backbone, "avgpool")


def test_backbone_unknown_node_lists_candidates():
    traced = trace(ResNet20().eval()).graph_module

    with pytest.raises(FeatureNodeError, match="'pool5' not found.*flatten"):
        cut_backbone(traced, "pool5")


def test_backbone_without_linear_names_the_option():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    with pytest.raises(FeatureNodeError, match="no nn.Linear.*--feature-node"):
        _backbone(model)


def test_backbone_drops_darts_auxiliary_head():
    model = DARTS(C=8, layers=5, auxiliary=True).train()

    backbone = _backbone(model)
    features = backbone(torch.randn(2, 3, 32, 32))

    assert isinstance(features, torch.Tensor)
    assert features.shape == (2, 128)
    assert not any(name.startswith("auxiliary") for name, _ in backbone.named_modules())


def test_wrapped_backbone_computes_the_backbone():
    backbone = _backbone(randomize_batchnorm(ResNet20()).eval())
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    wrapped = fxadapt.wrap(backbone, example).eval()
    with torch.no_grad():
        expected = backbone(example)
        actual = wrapped(example)

    assert len(fxadapt.edge_table(wrapped).edges) == 18
    torch.testing.assert_close(actual, expected)


def test_wrapped_backbone_keeps_cells():
    example = torch.randn(2, 3, 32, 32)
    original = fxadapt.wrap(ResNet20(), example, scope="cell")

    wrapped = fxadapt.wrap(_backbone(ResNet20()), example, scope="cell")

    assert len(fxadapt.edge_table(wrapped).theta_groups()) == len(
        fxadapt.edge_table(original).theta_groups()
    )


# One SimCLR step on zoo backbones


def _simclr_step_derive_export(model: nn.Module, input_shape, tmp_path: Path) -> dict:
    """Wraps the model's backbone, takes a weight and a theta step, derives and exports."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *input_shape, generator=generator)
    wrapped = fxadapt.wrap(_backbone(model), example)
    with torch.no_grad():
        feature_dim = wrapped.eval()(example).flatten(1).shape[1]
    wrapped.train()
    objective = SimCLR([], feature_dim)
    config = TrainConfig(epochs=1, arch_epochs=1, optimizer="adam", lr=1e-3)
    trainer = Trainer(wrapped, [], [], config, objective=objective)
    thetas = fxadapt.arch_parameters(wrapped)
    thetas_before = [theta.detach().clone() for theta in thetas]

    images = torch.randn(4, *input_shape, generator=generator)
    views = (images[:2], images[2:])
    result = trainer.train_step((views, torch.zeros(2)), update_theta=True)
    trainer.derive()
    derived = trainer.derived.cpu().eval()
    path = fxadapt.export(derived, tmp_path / "model.ts", example)
    with torch.no_grad():
        expected = derived(images)
        actual = load_exported(path, "torchscript")(images)
    return {
        "loss": result.loss.item(),
        "correct": result.correct,
        "thetas_moved": [
            not torch.equal(before, after)
            for before, after in zip(thetas_before, thetas, strict=True)
        ],
        "feature_dim": feature_dim,
        "expected": expected,
        "actual": actual,
    }


@pytest.mark.parametrize(
    ("build", "input_shape"),
    [(ResNet50, (3, 16, 16)), (lambda: DARTS(C=8, layers=5), (3, 32, 32))],
    ids=["resnet50", "darts"],
)
def test_zoo_backbone_takes_simclr_step_and_exports(build, input_shape, tmp_path):
    torch.manual_seed(0)

    outcome = _simclr_step_derive_export(build(), input_shape, tmp_path)

    assert math.isfinite(outcome["loss"])
    assert outcome["correct"] is None
    assert any(outcome["thetas_moved"])
    assert outcome["expected"].shape == (4, outcome["feature_dim"])
    torch.testing.assert_close(outcome["actual"], outcome["expected"])


def test_darts_24_cells_wrap_as_backbone():
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    backbone = _backbone(DARTS(C=4, layers=24).eval())

    wrapped = fxadapt.wrap(backbone, example).eval()
    with torch.no_grad():
        expected = backbone(example)
        actual = wrapped(example)

    assert len(fxadapt.edge_table(wrapped).edges) == 24 * 8
    torch.testing.assert_close(actual, expected)


# End to end


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "simclr"
    arguments = ["train", RESNET20, "--objective", "simclr", "--epochs", "2"]
    arguments += ["--arch-epochs", "1", "--train-limit", "300", "--test-limit", "100"]
    arguments += ["--no-draw", "--out", str(out)]
    status = main(arguments)
    return status, out


def test_simclr_run_reports_knn_accuracy_and_decisions(simclr_run):
    status, out = simclr_run
    report = json.loads((out / "report.json").read_text())

    assert status == 0
    assert report["accuracy"]["metric"] == "kNN accuracy (k=200)"
    assert report["accuracy"]["test"] > 0.1
    assert report["accuracy"]["train"] is None
    assert report["exported"] == "backbone features, 64-d"
    assert len(report["edges"]) == 18
    assert all(row["decision"] in row["options"] for row in report["edges"])
    assert "kNN accuracy (k=200):" in (out / "report.md").read_text()


def test_simclr_run_defaults_to_adam(simclr_run):
    _, out = simclr_run
    config = json.loads((out / "config.json").read_text())

    assert config["objective"] == "simclr"
    assert config["train"]["optimizer"] == "adam"
    assert config["train"]["lr"] == 1e-3
    assert config["wrap"]["backbone"] is True


def test_simclr_run_exports_the_backbone(simclr_run):
    _, out = simclr_run
    model = torch.jit.load(str(out / "model.ts"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert [record["test_loss"] for record in records] == [None, None]
    assert all(0.0 <= record["test_accuracy"] <= 1.0 for record in records)


def test_feature_node_without_simclr_is_rejected(tmp_path, capsys):
    arguments = ["train", RESNET20, "--feature-node", "flatten", "--out", str(tmp_path / "run")]

    status = main(arguments)

    assert status == 2
    assert "--objective simclr" in capsys.readouterr().err
