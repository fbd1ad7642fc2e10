"""Models too large for one protobuf are saved with external data.

A > 2 GiB model cannot be tested here, so `EXTERNAL_DATA_THRESHOLD` is
monkeypatched down to a few KiB: a model built in memory (no external data on
input) whose weights exceed it must come out with its weights in
`<name>.data`, load back lazily, and compute the same thing. The benchmark
`tools/bench_large_model.py` covers the real > 2 GiB case and its memory use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import optc.ir as oi
from optc.driver import CompileOptions, compile_file
from optc.ir import io as ir_io

#: The protobuf size limit; the threshold must leave room below it for the graph itself.
PROTOBUF_LIMIT = 2**31
THRESHOLD = 16 * 1024


def _in_memory_model(hidden: int = 64, layers: int = 3, seed: int = 0) -> oi.Model:
    """X -> (MatMul W_i -> Add b_i) x layers -> Y, every weight a numpy tensor (nothing external)."""
    rng = np.random.default_rng(seed)
    x = oi.make_value("X", oi.DataType.FLOAT, ["batch", hidden])
    graph = oi.Graph([x], [], nodes=[], opset_imports={"": oi.DEFAULT_OPSET}, name="large_save")
    h = x
    for i in range(layers):
        w = oi.add_initializer(
            graph, f"W{i}", rng.standard_normal((hidden, hidden)).astype(np.float32)
        )
        b = oi.add_initializer(graph, f"b{i}", rng.standard_normal(hidden).astype(np.float32))
        mm = oi.make_node("MatMul", [h, w], output_names=[f"mm{i}"])
        add = oi.make_node("Add", [mm.outputs[0], b], output_names=[f"h{i}"])
        graph.extend([mm, add])
        h = add.outputs[0]
    h.name = "Y"
    h.dtype, h.shape = oi.DataType.FLOAT, oi.Shape(["batch", hidden])
    graph.outputs.append(h)
    model = oi.Model(graph, ir_version=oi.DEFAULT_IR_VERSION)
    oi.verify(model)
    return model


def _external_names(path: Path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["Y"], {"X": x})[0]


@pytest.fixture
def small_threshold(monkeypatch) -> int:
    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", THRESHOLD)
    return THRESHOLD


def test_threshold_is_below_the_protobuf_limit() -> None:
    # Any model whose weights could overflow one protobuf goes to external data.
    assert 0 < ir_io.EXTERNAL_DATA_THRESHOLD <= PROTOBUF_LIMIT // 2


def test_large_in_memory_model_saves_as_external_data(tmp_path, small_threshold) -> None:
    model = _in_memory_model()
    assert not oi.has_external_data(model)
    assert oi.initializer_bytes(model.graph) > small_threshold
    expected = {n: v.const_value.numpy().copy() for n, v in model.graph.initializers.items()}

    dst = oi.save_model(model, tmp_path / "big.onnx")

    data = tmp_path / "big.onnx.data"
    assert data.is_file()
    assert _external_names(dst) == {
        "W0",
        "W1",
        "W2",
    }  # 16 KiB each; the 256-byte biases stay inline
    assert dst.stat().st_size < small_threshold  # the protobuf holds the graph, not the weights
    assert ir_io.model_files(dst) == sorted([dst, data])
    # The in-memory model is unchanged by saving.
    assert not oi.has_external_data(model)

    again = oi.load_model(dst)
    for name, array in expected.items():
        tensor = again.graph.initializers[name].const_value
        assert isinstance(tensor, oi.ExternalTensor) == name.startswith("W")
        np.testing.assert_array_equal(tensor.numpy(), array)

    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    inline = oi.save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not _external_names(inline)
    np.testing.assert_array_equal(_run(dst, x), _run(inline, x))


def test_weights_at_the_threshold_stay_inline(tmp_path, monkeypatch) -> None:
    model = _in_memory_model()
    total = oi.initializer_bytes(model.graph)
    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", total)
    assert not _external_names(oi.save_model(model, tmp_path / "at.onnx"))
    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", total - 1)
    assert _external_names(oi.save_model(model, tmp_path / "over.onnx"))


def test_resaving_external_weights_copies_without_reading_them(
    tmp_path, small_threshold, monkeypatch
) -> None:
    """Re-saving copies external weights file to file (no numpy array, no bytes object)."""
    src = oi.save_model(_in_memory_model(), tmp_path / "a.onnx")
    model = oi.load_model(src)

    def boom(self, *args, **kwargs):
        raise AssertionError(f"external tensor data was read into memory: {self.name}")

    for method in ("_load", "numpy", "tobytes", "__array__"):
        monkeypatch.setattr(oi.ExternalTensor, method, boom)
    (tmp_path / "out").mkdir()
    dst = oi.save_model(model, tmp_path / "out" / "b.onnx")
    monkeypatch.undo()

    assert _external_names(dst) == {"W0", "W1", "W2"}
    a, b = oi.load_model(src), oi.load_model(dst)
    for name in a.graph.initializers:
        np.testing.assert_array_equal(
            a.graph.initializers[name].const_value.numpy(),
            b.graph.initializers[name].const_value.numpy(),
        )


def test_compile_inline_input_writes_external_output(tmp_path, small_threshold) -> None:
    """Through the driver and the ort backend (runtime check on): inline in, external out."""
    src = oi.save_model(_in_memory_model(), tmp_path / "in.onnx", external_data=False)
    assert not (tmp_path / "in.onnx.data").exists()

    result = compile_file(src, tmp_path / "out.onnx", CompileOptions(passes="dce"))

    assert result.artifact.checks  # onnxruntime opened the staged output
    assert (tmp_path / "out.onnx.data").is_file()
    assert _external_names(tmp_path / "out.onnx") == {"W0", "W1", "W2"}
    assert result.artifact.size_bytes == oi.model_size_bytes(tmp_path / "out.onnx")
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(tmp_path / "out.onnx", x), _run(src, x))
