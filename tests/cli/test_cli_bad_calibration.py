"""Bad calibration arrays (`--calib npz:FILE`) are refused before any pass runs: one line naming the array and
what is wrong, exit 1, no reproducer, nothing written, the input untouched, and nothing ever unpickled."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.cli.cli_support import Job, run_in_process, snapshot

FEATURES = 16


def _model(path: Path, batch: int | str = "batch") -> Path:
    """x [batch, 16] float -> MatMul [16, 8] -> y: something for `quantize` to calibrate."""
    weight = np.random.default_rng(0).standard_normal((FEATURES, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "calib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return path


def _good(samples: int = 3) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((samples, FEATURES)).astype(np.float32)


class _Marker:
    """Unpickling this touches the marker file: the proof that an object array was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _object_array(folder: Path) -> dict[str, np.ndarray]:
    array = np.empty((2, FEATURES), dtype=object)
    array[:] = _Marker(folder / "unpickled")
    return {"x": array}


def _with_nan(folder: Path) -> dict[str, np.ndarray]:
    data = _good()
    data[1, 3] = np.nan
    return {"x": data}


def _with_inf(folder: Path) -> dict[str, np.ndarray]:
    data = _good()
    data[2, 0] = -np.inf
    return {"x": data}


#: name: (the arrays, text the error line must contain)
CASES: dict[str, tuple[Callable[[Path], dict[str, np.ndarray]], list[str]]] = {
    "wrong-name": (lambda d: {"input": _good()}, ["'input'", "do not match the model inputs", "missing ['x']"]),
    "extra-array": (lambda d: {"x": _good(), "mask": _good()}, ["unexpected ['mask']"]),
    "wrong-dtype": (lambda d: {"x": _good().astype(np.float64)}, ["array 'x' is float64", "float32"]),
    "integer-dtype": (lambda d: {"x": _good().astype(np.int32)}, ["array 'x' is int32"]),
    "wrong-rank": (lambda d: {"x": _good()[..., None]}, ["array 'x' has rank 3", "rank 2"]),
    "wrong-shape": (lambda d: {"x": np.zeros((3, FEATURES + 1), np.float32)}, ["array 'x' has shape [3, 17]", "16 on axis 1"]),
    "scalar": (lambda d: {"x": np.float32(1.0)}, ["array 'x' is a scalar"]),
    "no-samples": (lambda d: {"x": np.zeros((0, FEATURES), np.float32)}, ["array 'x' holds no samples"]),
    "nan": (_with_nan, ["array 'x'", "NaN or infinite", "[1, 3]"]),
    "inf": (_with_inf, ["array 'x'", "NaN or infinite", "[2, 0]"]),
    "object-array": (_object_array, ["array 'x' holds Python objects", "never unpickles"]),
}


def _check(run, folder: Path, files: dict[str, str], mentions: list[str]) -> None:
    assert run.returncode == 1, run
    assert "Traceback" not in run.stderr and run.stdout == "", run
    assert len(run.stderr_lines) == 1 and run.stderr.startswith("optc: error: --calib npz:"), run
    for text in mentions:
        assert text in run.stderr, f"{text!r} not in {run.stderr!r}"
    assert "reproducer" not in run.stderr and "pass '" not in run.stderr, run
    assert snapshot(folder) == files  # no output, no reproducer, the input and the data untouched
    assert not (folder / "unpickled").exists()


def _run(folder: Path, *extra: str):
    job = Job(["model.onnx", "--passes", "quantize", "--calib", "npz:calib.npz", *extra, "-o", "out.onnx"], folder)
    return run_in_process(job)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_calibration_arrays_are_one_line_before_any_pass(name: str, tmp_path: Path) -> None:
    make, mentions = CASES[name]
    _model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", **make(tmp_path))
    files = snapshot(tmp_path)
    _check(_run(tmp_path), tmp_path, files, mentions)


def test_a_model_with_a_fixed_batch_is_named(tmp_path: Path) -> None:
    _model(tmp_path / "model.onnx", batch=4)
    np.savez(tmp_path / "calib.npz", x=_good())
    files = snapshot(tmp_path)
    _check(_run(tmp_path), tmp_path, files, ["'x' has a fixed batch of 4", "one sample at a time"])


def test_a_single_npy_array_is_not_an_archive(tmp_path: Path) -> None:
    _model(tmp_path / "model.onnx")
    with open(tmp_path / "calib.npz", "wb") as stream:
        np.save(stream, _good())
    files = snapshot(tmp_path)
    _check(_run(tmp_path), tmp_path, files, ["not a .npz archive"])


def test_a_header_that_lies_about_the_shape_allocates_nothing(tmp_path: Path) -> None:
    """A member whose header declares 4 GB of float32 but holds 64 bytes is refused from the header alone."""
    _model(tmp_path / "model.onnx")
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "<f4", "fortran_order": False, "shape": (2**28, FEATURES)}
    )
    with zipfile.ZipFile(tmp_path / "calib.npz", "w") as archive:
        archive.writestr("x.npy", buffer.getvalue() + bytes(64))
    files = snapshot(tmp_path)
    _check(_run(tmp_path), tmp_path, files, ["array 'x' declares shape [268435456, 16]", "holds 64 bytes"])


def test_good_arrays_still_calibrate(tmp_path: Path) -> None:
    _model(tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", x=_good())
    run = _run(tmp_path, "--no-runtime-check")
    assert run.returncode == 0, run
    assert (tmp_path / "out.onnx").is_file()


def test_text_calibration_for_a_model_without_token_ids_is_one_line_without_a_reproducer(tmp_path: Path) -> None:
    _model(tmp_path / "model.onnx")
    (tmp_path / "corpus.txt").write_text("some text\n")
    files = snapshot(tmp_path)
    job = Job(["model.onnx", "--passes", "quantize", "--calib", "text:corpus.txt", "-o", "out.onnx"], tmp_path)
    run = run_in_process(job)
    assert run.returncode == 1 and len(run.stderr_lines) == 1, run
    assert "--calib text:corpus.txt: the model has no 'input_ids' input (inputs: x)" in run.stderr, run
    assert "reproducer" not in run.stderr
    assert snapshot(tmp_path) == files


def test_a_compressed_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    """A few hundred kB of zeros that would expand to 128 MiB: refused from the zip directory alone."""
    _model(tmp_path / "model.onnx")
    rows = 2**21
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, FEATURES)})
    with zipfile.ZipFile(tmp_path / "calib.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive, \
            archive.open("x.npy", "w", force_zip64=True) as member:
        member.write(buffer.getvalue())
        chunk = bytes(2**20)
        for _ in range(rows * FEATURES * 4 // len(chunk)):
            member.write(chunk)
    assert (tmp_path / "calib.npz").stat().st_size < 1_000_000
    files = snapshot(tmp_path)
    _check(_run(tmp_path), tmp_path, files, ["array 'x' expands from", "more than 100:1"])
