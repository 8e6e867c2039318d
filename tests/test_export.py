"""Exported files reproduce the derived module, and TorchScript loads without fxadapt."""

import subprocess
import sys

import pytest
import torch

import fxadapt
from fxadapt.errors import ExportError
from fxadapt.export import load_exported
from fxadapt.models import ResNet20

from conftest import randomize_batchnorm


@pytest.fixture(scope="module")
def derived():
    torch.manual_seed(0)
    wrapped = fxadapt.wrap(randomize_batchnorm(ResNet20()), torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        wrapped.fxadapt_mixed["e0"].theta_same.fill_(-1.0)
        wrapped.fxadapt_mixed["e0"].theta_identity.fill_(0.5)
        wrapped.fxadapt_mixed["e13"].theta_same.fill_(-1.0)
        wrapped.fxadapt_mixed["e16"].theta_same.fill_(0.5)
    return fxadapt.derive(wrapped).eval()


def test_torchscript_loads_without_fxadapt(derived, tmp_path):
    example = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    path = fxadapt.export(derived, tmp_path / "model.ts", example[:2])
    torch.save(example, tmp_path / "input.pt")
    script = (
        "import sys, torch\n"
        f"model = torch.jit.load({str(path)!r})\n"
        f"output = model(torch.load({str(tmp_path / 'input.pt')!r}))\n"
        f"torch.save(output, {str(tmp_path / 'output.pt')!r})\n"
        "print(any(name.startswith('fxadapt') for name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    with torch.no_grad():
        expected = derived(example)

    assert result.stdout.strip() == "False"
    assert torch.allclose(torch.load(tmp_path / "output.pt"), expected, atol=1e-5)


def test_torchscript_has_no_more_parameters(derived, tmp_path):
    path = fxadapt.export(derived, tmp_path / "model.ts", torch.randn(2, 3, 32, 32))
    loaded = load_exported(path)
    exported_parameters = sum(p.numel() for p in loaded.parameters())

    assert exported_parameters == sum(p.numel() for p in derived.parameters())
    assert exported_parameters < sum(p.numel() for p in ResNet20().parameters())


def test_exported_program_matches(derived, tmp_path):
    example = torch.randn(2, 3, 32, 32)
    path = fxadapt.export(derived, tmp_path / "model.pt2", example, format="exported-program")

    with torch.no_grad():
        assert torch.allclose(
            load_exported(path, "exported-program")(example), derived(example), atol=1e-5
        )


class Unscriptable(torch.nn.Module):
    def forward(self, x):
        return x.numpy()


def test_failed_export_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="torchscript export of Unscriptable failed"):
        fxadapt.export(Unscriptable(), tmp_path / "model.ts", torch.randn(2, 3))

    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_rejected(derived, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'onnx2'"):
        fxadapt.export(derived, tmp_path / "model.x", torch.randn(2, 3, 32, 32), format="onnx2")
