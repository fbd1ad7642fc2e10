"""`optc.compile`: the Python API on arbitrary nn.Modules, IR models and paths."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import optc
from optc.errors import OptcError
from tests.fixtures import models


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 4, 3, stride=2)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(image)))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.mean(dim=(2, 3)))


class SmallMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 3)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(features), dim=-1)


def _randomize_norm(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for sub in module.modules():
        if isinstance(sub, torch.nn.BatchNorm2d):
            sub.running_mean.uniform_(-0.5, 0.5)
            sub.running_var.uniform_(0.5, 2.0)
    return module.eval()


@pytest.mark.parametrize(
    ("module", "shape"),
    [(SmallCNN, (2, 3, 16, 16)), (SmallMLP, (4, 12))],
    ids=["cnn", "mlp"],
)
def test_compile_module_matches_pytorch(tmp_path, module, shape):
    torch.manual_seed(1)
    net = _randomize_norm(module())
    result = optc.compile(net, example_inputs=torch.randn(*shape), output=tmp_path / "out.onnx", verify_each=True)
    assert result.artifact.path.is_file()
    assert "wrote" in result.summary()
    session = ort.InferenceSession(str(result.artifact.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 5):  # the batch axis is dynamic
        x = torch.randn(batch, *shape[1:])
        got = session.run(None, {name: x.numpy()})[0]
        want = net(x).detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_compile_ir_model_and_path(tmp_path):
    proto = models.duplicated_subgraph()
    model = models.to_ir(proto)
    result = optc.compile(model, output=tmp_path / "a.onnx", passes="cse,dce")
    assert result.nodes_after < result.nodes_before
    source = tmp_path / "in.onnx"
    import onnx

    onnx.save(proto, source)
    again = optc.compile(str(source), output=tmp_path / "b.onnx", passes="cse,dce")
    assert again.nodes_after == result.nodes_after


def test_compile_module_needs_example_inputs(tmp_path):
    with pytest.raises(OptcError, match="example_inputs"):
        optc.compile(SmallMLP(), output=tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_compile_rejects_other_objects(tmp_path):
    with pytest.raises(OptcError, match="cannot compile a dict"):
        optc.compile({}, output=tmp_path / "x.onnx")
