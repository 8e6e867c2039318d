"""Exported files reproduce the derived module, and TorchScript loads without fxadapt."""

import importlib
import importlib.util
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
from torch import nn

import fxadapt
from fxadapt.errors import ExportError
from fxadapt.export import load_exported
from fxadapt.models import ResNet20

from conftest import randomize_batchnorm

# The module, which the package's ``export`` function hides.
export_module = importlib.import_module("fxadapt.export")

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")),
    reason='ONNX export needs onnx, onnxscript and onnxruntime: pip install "fxadapt[onnx]"',
)


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


class DataDependentGenerator(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this, so the module becomes a leaf
            x = x * 2
        return sum(part for part in (x, x))  # TorchScript compiles no generator expression


class LeafInBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.leaf = DataDependentGenerator()

    def forward(self, x):
        return x + self.leaf(self.conv(x))


def test_unscriptable_leaf_is_traced(example_input, tmp_path, caplog):
    derived = fxadapt.derive(fxadapt.wrap(LeafInBranch(), example_input)).eval()
    path = fxadapt.export(derived, tmp_path / "model.ts", example_input)

    with torch.no_grad():
        expected = derived(example_input)
    assert torch.allclose(load_exported(path)(example_input), expected, atol=1e-6)
    assert "TorchScript cannot script leaf, so it is traced" in caplog.text


class GeneratorSum(nn.Module):
    def forward(self, x):
        return sum(part for part in (x, x))


def test_unscriptable_module_is_traced(tmp_path, caplog):
    example = torch.randn(2, 3)
    path = fxadapt.export(GeneratorSum(), tmp_path / "model.ts", example)

    assert torch.allclose(load_exported(path)(example), 2 * example)
    assert "so the whole module is traced" in caplog.text


class Logits(NamedTuple):
    main: torch.Tensor
    auxiliary: torch.Tensor


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Linear(3, 2)
        self.auxiliary = nn.Linear(3, 2)

    def forward(self, x):
        return Logits(self.main(x), self.auxiliary(x))


def test_namedtuple_output_exports_as_tuple(tmp_path, caplog):
    model = TwoHeads().eval()
    example = torch.randn(2, 3)
    path = fxadapt.export(model, tmp_path / "model.pt2", example, format="exported-program")
    output = load_exported(path, "exported-program")(example)

    with torch.no_grad():
        expected = model(example)
    assert type(output) is tuple
    assert torch.allclose(output[0], expected.main)
    assert torch.allclose(output[1], expected.auxiliary)
    assert "as a plain tuple of tensors" in caplog.text


def test_unknown_format_is_rejected(derived, tmp_path):
    with pytest.raises(ValueError, match="unknown export format 'onnx2'"):
        fxadapt.export(derived, tmp_path / "model.x", torch.randn(2, 3, 32, 32), format="onnx2")


@needs_onnx
def test_onnx_matches(derived, tmp_path):
    example = torch.randn(2, 3, 32, 32)
    path = fxadapt.export(derived, tmp_path / "model.onnx", example, format="onnx")

    with torch.no_grad():
        expected = derived(example)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["model.onnx"]
    assert torch.allclose(load_exported(path, "onnx")(example), expected, atol=1e-5)


@needs_onnx
def test_onnx_large_weights_go_beside(derived, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "_ONNX_MAX_INLINE_BYTES", 0)
    example = torch.randn(2, 3, 32, 32)
    path = fxadapt.export(derived, tmp_path / "model.onnx", example, format="onnx")

    with torch.no_grad():
        expected = derived(example)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert torch.allclose(load_exported(path, "onnx")(example), expected, atol=1e-5)


@needs_onnx
def test_onnx_falls_back_to_older_exporter(derived, tmp_path, monkeypatch):
    onnx_export = torch.onnx.export

    def export_failing_with_dynamo(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("decomposition failed")
        return onnx_export(*args, dynamo=False, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_failing_with_dynamo)
    example = torch.randn(2, 3, 32, 32)
    path = fxadapt.export(derived, tmp_path / "model.onnx", example, format="onnx")

    with torch.no_grad():
        expected = derived(example)
    assert torch.allclose(load_exported(path, "onnx")(example), expected, atol=1e-5)


def test_onnx_without_onnxruntime_names_extra(derived, tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec

    def find_spec_without_onnxruntime(name, *args, **kwargs):
        return None if name == "onnxruntime" else find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_onnxruntime)
    with pytest.raises(ExportError, match=r"needs onnxruntime.*fxadapt\[onnx\]"):
        fxadapt.export(derived, tmp_path / "model.onnx", torch.randn(2, 3, 32, 32), format="onnx")

    assert list(tmp_path.iterdir()) == []
