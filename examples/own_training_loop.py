"""Adapt a network inside your own training loop with fxadapt's Python API.

Runs on the embedded digits data in about a minute on a laptop CPU:

    python examples/own_training_loop.py

The steps: wrap the model, give its weights and its theta separate optimizers, fuse it for
training, alternate one weight step and one theta step on every batch, derive the smaller
network, train it on, and export it to TorchScript.
"""

import torch
from torch import nn

import fxadapt
from fxadapt.data import load_data, make_loaders
from fxadapt.models import ResNet20


def train_epoch(model, loader, weight_optimizer, theta_optimizer=None, thetas=()):
    criterion = nn.CrossEntropyLoss()
    model.train()
    for images, labels in loader:
        weight_optimizer.zero_grad()
        criterion(model(images), labels).backward()
        weight_optimizer.step()

        if theta_optimizer is not None:
            # Same batch, updated weights: the gradient of theta alone.
            theta_optimizer.zero_grad()
            loss = criterion(model(images), labels)
            for theta, gradient in zip(thetas, torch.autograd.grad(loss, thetas), strict=True):
                theta.grad = gradient
            theta_optimizer.step()


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in loader)
    return correct / len(loader.dataset)


def main():
    torch.manual_seed(0)
    data = load_data("digits")
    train_loader, test_loader = make_loaders(data, batch_size=32)
    example_input = next(iter(test_loader))[0][:2]

    wrapped = fxadapt.wrap(ResNet20(num_classes=data.num_classes), example_input)
    thetas = fxadapt.arch_parameters(wrapped)
    weight_optimizer = torch.optim.SGD(fxadapt.weight_parameters(wrapped), lr=0.05, momentum=0.9)
    theta_optimizer = torch.optim.Adam(thetas, lr=0.05, betas=(0.5, 0.999))

    # The fused module shares every weight and theta with ``wrapped`` and trains faster.
    # Derive ``wrapped``, whose graph still has the mixed edges.
    fused = fxadapt.fuse(wrapped)
    for _ in range(2):
        train_epoch(fused, train_loader, weight_optimizer, theta_optimizer, thetas)

    derived = fxadapt.derive(wrapped)
    for edge in fxadapt.edge_table(derived).edges:
        print(f"{edge.name} in {edge.cell}: {edge.decision}")

    # The derived module is a new module: build a new optimizer around it.
    optimizer = torch.optim.SGD(derived.parameters(), lr=0.05, momentum=0.9)
    train_epoch(derived, train_loader, optimizer)
    print(f"test accuracy of the derived network: {accuracy(derived, test_loader):.1%}")

    fxadapt.export(derived, "derived-digits.ts", example_input)
    print("wrote derived-digits.ts")


if __name__ == "__main__":
    main()
