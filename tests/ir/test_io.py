"""ONNX import/export: round trips, lazy external data, atomic saves, clear load errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import optc.ir as oi
from optc.errors import ModelLoadError, OptcError
from optc.ir import io as ir_io
from tests.fixtures import models

# Weights large enough to go to external data (> EXTERNAL_TENSOR_MIN_BYTES): W1 is 32x64 floats.
BIG = {"features": 32, "hidden": 64, "outputs": 8}


def _initializers(proto: onnx.ModelProto, base_dir: Path | None = None) -> dict[str, tuple[int, tuple, bytes]]:
    """name -> (dtype, shape, raw bytes), reading external data relative to base_dir."""
    out = {}
    for t in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(t, base_dir=str(base_dir) if base_dir else "")
        out[t.name] = (t.data_type, tuple(t.dims), array.tobytes())
    return out


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _save_external(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Save with onnx itself, every tensor of at least 1 KiB in `<name>.data` (`proto` is not changed)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # onnx.save_model rewrites the proto it saves to point at the data file
    onnx.save_model(
        copy, path, save_as_external_data=True, all_tensors_to_one_file=True,
        location=name + ".data", size_threshold=1024,
    )
    return path


@pytest.fixture
def forbid_weight_reads(monkeypatch):
    """Make any read of external tensor data fail the test."""

    def boom(self, *args, **kwargs):
        raise AssertionError(f"external tensor data was read: {self.name}")

    for method in ("_load", "numpy", "tobytes", "tofile", "__array__"):
        monkeypatch.setattr(oi.ExternalTensor, method, boom)


# --- round trips -------------------------------------------------------------------------


def test_round_trip_untouched_model_same_outputs_and_initializers(any_model_proto, tmp_path):
    src = tmp_path / "in.onnx"
    onnx.save_model(any_model_proto, src)
    model = oi.load_model(src)
    dst = tmp_path / "out.onnx"
    assert oi.save_model(model, dst) == dst
    assert not (tmp_path / "out.onnx.data").exists()

    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert _initializers(out) == _initializers(any_model_proto)
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in any_model_proto.graph.node]
    feeds = models.random_inputs(any_model_proto)
    for got, want in zip(models.run_ort(dst, feeds), models.run_ort(src, feeds), strict=True):
        np.testing.assert_array_equal(got, want)


def test_external_data_stays_external_and_lazy(tmp_path, forbid_weight_reads):
    proto = models.mlp(**BIG)
    src = _save_external(proto, tmp_path / "in")
    model = oi.load_model(src)  # must not read any weight
    external = {n for n, v in model.graph.initializers.items() if isinstance(v.const_value, oi.ExternalTensor)}
    assert external == {"W1", "W2"}  # 8 KiB and 2 KiB; the biases are small and inline
    assert oi.has_external_data(model)
    oi.verify(model)  # verification reads metadata only
    oi.print_ir(model, max_elements=16)


def test_external_data_round_trip(tmp_path):
    proto = models.mlp(**BIG)
    src = _save_external(proto, tmp_path / "in")
    before = _digest(src.parent)
    model = oi.load_model(src)

    (tmp_path / "out").mkdir()
    dst = oi.save_model(model, tmp_path / "out" / "m.onnx")
    assert sorted(p.name for p in dst.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    saved = onnx.load(dst, load_external_data=False)
    locations = {
        t.name: {e.key: e.value for e in t.external_data}["location"]
        for t in saved.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    assert locations == {"W1": "m.onnx.data", "W2": "m.onnx.data"}
    # The input model and its data file are untouched, and the IR still points at them.
    assert _digest(src.parent) == before
    assert Path(model.graph.initializers["W1"].const_value.path).parent == src.parent

    assert _initializers(onnx.load(dst, load_external_data=False), dst.parent) == _initializers(proto)
    assert oi.model_size_bytes(dst) == dst.stat().st_size + (dst.parent / "m.onnx.data").stat().st_size
    feeds = models.random_inputs(proto)
    np.testing.assert_array_equal(models.run_ort(dst, feeds)[0], models.run_ort(proto, feeds)[0])
    # And the saved model loads back lazily.
    again = oi.load_model(dst)
    assert isinstance(again.graph.initializers["W1"].const_value, oi.ExternalTensor)


def test_tensor_of_exactly_min_bytes_stays_external(tmp_path):
    # onnx externalizes tensors of >= size_threshold bytes; a 1 KiB weight must not come back inline.
    proto = models.mlp(features=16, hidden=16, outputs=16)  # W1, W2: 16x16 floats = 1024 bytes
    model = oi.load_model(_save_external(proto, tmp_path / "in"))
    assert isinstance(model.graph.initializers["W2"].const_value, oi.ExternalTensor)
    dst = oi.save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(dst, load_external_data=False)
    external = sorted(t.name for t in saved.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    assert external == ["W1", "W2"]


def test_threshold_picks_external_data(tmp_path, monkeypatch):
    model = models.to_ir(models.mlp(**BIG))
    assert not oi.has_external_data(model)
    oi.save_model(model, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()

    monkeypatch.setattr(ir_io, "EXTERNAL_DATA_THRESHOLD", 4096)
    assert oi.initializer_bytes(model.graph) > 4096
    dst = oi.save_model(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    saved = onnx.load(dst, load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    # Explicit choice beats the rule.
    oi.save_model(model, tmp_path / "forced.onnx", external_data=False)
    assert not (tmp_path / "forced.onnx.data").exists()


def test_lazy_weights_save_as_external_data(tmp_path):
    """A weight read lazily (a checkpoint tensor) makes the model save with external data: one tensor at a
    time, never one protobuf holding every weight, whatever the size."""
    model = models.to_ir(models.mlp(**BIG))
    value = model.graph.initializers["W1"]
    array = value.const_value.numpy().copy()
    value.const_value = oi.LazyTensor(lambda: oi.Tensor(array.copy()), dtype=value.const_value.dtype,
                                      shape=oi.Shape(list(array.shape)))
    assert oi.has_external_data(model)
    dst = oi.save_model(model, tmp_path / "lazy.onnx")
    assert (tmp_path / "lazy.onnx.data").is_file()
    np.testing.assert_array_equal(oi.load_model(dst).graph.initializers["W1"].const_value.numpy(), array)


def test_external_data_forced_on(tmp_path):
    model = models.to_ir(models.mlp(**BIG))
    dst = oi.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").is_file()
    again = oi.load_model(dst)
    assert oi.has_external_data(again)
    np.testing.assert_array_equal(
        again.graph.initializers["W1"].const_value.numpy(), model.graph.initializers["W1"].const_value.numpy()
    )


def test_overwrite_existing_output(tmp_path):
    dst = tmp_path / "m.onnx"
    dst.write_bytes(b"old")
    oi.save_model(models.to_ir(models.mlp()), dst)
    assert oi.load_model(dst).graph.num_nodes() == 5


def test_metadata_and_annotations_survive_save_load(tmp_path, mlp):
    oi.set_model_metadata(mlp, "architecture", "mlp")
    oi.annotate(next(iter(mlp.graph)), "quant", {"bits": 4})
    oi.set_source_name(mlp.graph.initializers["W1"], "layers.0.weight")
    again = oi.load_model(oi.save_model(mlp, tmp_path / "m.onnx"))
    assert oi.model_metadata(again, "architecture") == "mlp"
    assert oi.annotation(next(iter(again.graph)), "quant") == {"bits": 4}
    assert oi.source_name(again.graph.initializers["W1"]) == "layers.0.weight"


# --- atomicity ---------------------------------------------------------------------------


@pytest.mark.parametrize("external", [False, True])
def test_failing_check_leaves_nothing(tmp_path, external):
    model = models.to_ir(models.mlp(**BIG))
    seen = []

    def check(staged: Path) -> None:
        seen.append(staged)
        assert staged.is_file()
        assert staged.parent != tmp_path  # staged beside, not at, the destination
        raise RuntimeError("check failed")

    with pytest.raises(RuntimeError, match="check failed"):
        oi.save_model(model, tmp_path / "m.onnx", external_data=external, check=check)
    assert len(seen) == 1
    assert list(tmp_path.iterdir()) == []  # no model, no data file, no staging folder


def test_failing_check_keeps_previous_output(tmp_path):
    dst = oi.save_model(models.to_ir(models.mlp()), tmp_path / "m.onnx")
    before = dst.read_bytes()

    def check(staged: Path) -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError):
        oi.save_model(models.to_ir(models.dead_nodes()), dst, check=check)
    assert dst.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_passing_check_sees_complete_model(tmp_path):
    def check(staged: Path) -> None:
        onnx.checker.check_model(str(staged))

    oi.save_model(models.to_ir(models.mlp(**BIG)), tmp_path / "m.onnx", external_data=True, check=check)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_save_into_missing_folder(tmp_path):
    with pytest.raises(OptcError, match="does not exist"):
        oi.save_model(models.to_ir(models.mlp()), tmp_path / "nope" / "m.onnx")


def test_remove_model(tmp_path):
    dst = oi.save_model(models.to_ir(models.mlp(**BIG)), tmp_path / "m.onnx", external_data=True)
    ir_io.remove_model(dst)
    assert list(tmp_path.iterdir()) == []
    ir_io.remove_model(dst)  # already gone: no error


# --- load errors -------------------------------------------------------------------------


def _expect_load_error(path: Path, *fragments: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        oi.load_model(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert "\n" not in message
    return info.value


def test_load_missing_file(tmp_path):
    _expect_load_error(tmp_path / "missing.onnx", "no such file")


def test_load_directory(tmp_path):
    _expect_load_error(tmp_path, "directory")


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    _expect_load_error(path, "empty")


@pytest.mark.parametrize("content", [b"hello, this is not an onnx model\n", os.urandom(64), b"\x08"])
def test_load_not_onnx(tmp_path, content):
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    _expect_load_error(path, "not an ONNX model")


def test_load_truncated_half(tmp_path):
    data = models.mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    _expect_load_error(path)


def test_load_truncated_anywhere(tmp_path):
    """Every prefix of a real model is rejected, never loaded as a smaller model."""
    data = models.if_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    for end in range(1, len(data)):
        path.write_bytes(data[:end])
        with pytest.raises(ModelLoadError, match="cut.onnx"):
            oi.load_model(path)


def test_load_missing_external_data(tmp_path):
    src = _save_external(models.mlp(**BIG), tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    _expect_load_error(src, "model.onnx.data", "missing")


def test_load_truncated_external_data(tmp_path):
    src = _save_external(models.mlp(**BIG), tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    _expect_load_error(src, "model.onnx.data", "truncated")


def test_load_from_other_cwd(tmp_path, monkeypatch):
    _save_external(models.mlp(**BIG), tmp_path / "deep" / "dir")
    monkeypatch.chdir(tmp_path)
    model = oi.load_model(Path("deep/dir/model.onnx"))
    proto = models.mlp(**BIG)
    np.testing.assert_array_equal(
        model.graph.initializers["W1"].const_value.numpy(), onnx.numpy_helper.to_array(proto.graph.initializer[0])
    )


# --- proto helpers -----------------------------------------------------------------------


def test_to_proto_max_elements_elides_without_reading(tmp_path, forbid_weight_reads):
    model = oi.load_model(_save_external(models.mlp(**BIG), tmp_path))
    proto = oi.to_proto(model, max_elements=16)
    kept = [t.name for t in proto.graph.initializer]
    assert kept == ["B2"]  # 8 elements; B1 has 64 and W1/W2 are external
    declared = {v.name for v in proto.graph.value_info}
    assert {"W1", "W2", "B1"} <= declared


def test_to_proto_and_from_proto(mlp, mlp_proto):
    proto = oi.to_proto(mlp)
    assert _initializers(proto) == _initializers(mlp_proto)
    again = oi.from_proto(proto)
    assert [n.name for n in again.graph] == [n.name for n in mlp.graph]
    node = oi.node_to_proto(next(iter(mlp.graph)))
    assert (node.op_type, list(node.input), list(node.output)) == ("MatMul", ["X", "W1"], ["h0"])
