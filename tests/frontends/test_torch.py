"""The PyTorch frontend: arbitrary `nn.Module`s through the dynamo exporter match PyTorch in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from optc.errors import OptcError
from optc.ir import save_model, verify

torch = pytest.importorskip("torch")
from optc.frontends.torch import export_module  # noqa: E402


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 3, padding=1, groups=2),
            torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class SmallMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.SiLU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 5),
        )

    def forward(self, x):
        return torch.softmax(self.net(x), dim=-1)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial normalization statistics and affine parameters (they start as 0 and 1), then eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) + 0.5)
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator) * 0.1)
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=generator) * 0.1)
                layer.running_var.copy_(torch.rand(layer.running_var.shape, generator=generator) + 0.5)
    return module.eval()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    module = _randomize(SmallCNN())
    return module, export_module(module, torch.randn(2, 3, 16, 16), input_names=["image"], output_names=["scores"])


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(1)
    module = _randomize(SmallMLP())
    return module, export_module(module, torch.randn(4, 20))


def _session(model, tmp_path):
    path = save_model(model, tmp_path / "model.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(module, session, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = module(inputs).numpy()
    name = session.get_inputs()[0].name
    (got,) = session.run(None, {name: inputs.numpy()})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_cnn_matches_pytorch(cnn, tmp_path, batch):
    module, model = cnn
    session = _session(model, tmp_path)
    _check(module, session, torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch)))


@pytest.mark.parametrize("batch", [1, 4, 7])
def test_mlp_matches_pytorch(mlp, tmp_path, batch):
    module, model = mlp
    session = _session(model, tmp_path)
    _check(module, session, torch.randn(batch, 20, generator=torch.Generator().manual_seed(batch)))


def test_names_and_dynamic_batch(cnn, mlp):
    _, model = cnn
    assert [v.name for v in model.graph.inputs] == ["image"]
    assert [v.name for v in model.graph.outputs] == ["scores"]
    assert not isinstance(model.graph.inputs[0].shape[0], int)  # symbolic batch
    assert list(model.graph.inputs[0].shape)[1:] == [3, 16, 16]
    _, model = mlp
    assert [v.name for v in model.graph.inputs] == ["x"]  # from forward's signature
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    verify(model)


def test_rejects_non_modules():
    with pytest.raises(OptcError, match="torch.nn.Module"):
        export_module(lambda x: x, torch.randn(1))
    with pytest.raises(OptcError, match="torch tensors"):
        export_module(SmallMLP(), [np.zeros((1, 20), np.float32)])


def test_export_failure_is_one_line():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
                return x + 1
            return x - 1

    with pytest.raises(OptcError, match="DataDependent") as info:
        export_module(DataDependent(), torch.randn(2, 3))
    assert "\n" not in str(info.value)
