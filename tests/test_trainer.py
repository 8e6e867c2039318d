"""The trainer's steps: which parameters each step moves, and what derivation hands on."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxadapt
from fxadapt.errors import FxadaptError
from fxadapt.trainer import TrainConfig, Trainer

from conftest import TwoBranch


def _trainer(**config):
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 8, 8, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    wrapped = fxadapt.wrap(TwoBranch(), images[:2])
    settings = {"epochs": 2, "arch_epochs": 1, "arch_lr": 0.1, **config}
    return Trainer(wrapped, loader, loader, TrainConfig(**settings)), next(iter(loader))


def _snapshot(parameters):
    return [parameter.detach().clone() for parameter in parameters]


def _moved(before, parameters):
    return [not torch.equal(old, new) for old, new in zip(before, parameters, strict=True)]


def test_weight_step_leaves_theta_alone():
    trainer, batch = _trainer()
    thetas = _snapshot(trainer.thetas)
    weights = _snapshot(trainer.weights)
    trainer.train_step(batch, update_theta=False)

    assert not any(_moved(thetas, trainer.thetas))
    assert all(_moved(weights, trainer.weights))


def test_theta_step_leaves_weights_and_statistics_alone():
    trainer, batch = _trainer()
    weights = _snapshot(trainer.weights)
    running_mean = trainer.wrapped.bn.running_mean.clone()
    thetas = _snapshot(trainer.thetas)
    trainer._theta_step(batch)

    assert not any(_moved(weights, trainer.weights))
    assert all(_moved(thetas, trainer.thetas))
    assert torch.equal(trainer.wrapped.bn.running_mean, running_mean)
    assert trainer.wrapped.bn.momentum == 0.1


def test_joint_step_moves_both():
    trainer, batch = _trainer(arch_update="joint")
    thetas = _snapshot(trainer.thetas)
    weights = _snapshot(trainer.weights)
    trainer.train_step(batch, update_theta=True)

    assert all(_moved(thetas, trainer.thetas))
    assert all(_moved(weights, trainer.weights))


def test_fit_derives_after_the_architecture_epochs():
    trainer, _ = _trainer()
    result = trainer.fit()

    assert [record.stage for record in result.history] == ["architecture", "network"]
    assert result.history[0].theta
    assert result.history[1].theta == {}
    assert not fxadapt.is_wrapped(result.derived)
    assert all(edge.decision is not None for edge in result.table.edges)


def test_learning_rate_schedule_continues_after_derivation():
    trainer, _ = _trainer(epochs=4, arch_epochs=2, lr=0.1)
    result = trainer.fit()
    rates = [record.lr for record in result.history]

    assert rates[0] == pytest.approx(0.1)
    assert rates[2] == pytest.approx(0.05)
    assert rates[3] < rates[2]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"arch_epochs": 3}, "--arch-epochs 3"),
        ({"lr": -1.0}, "--lr must be a positive"),
        ({"arch_every": 0}, "--arch-every"),
        ({"arch_update": "both"}, "invalid --arch-update"),
        ({"drop_path": 1.5}, "--drop-path"),
    ],
)
def test_invalid_settings_are_rejected(config, message):
    with pytest.raises(FxadaptError, match=message):
        _trainer(**config)
