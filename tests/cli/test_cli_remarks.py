"""Remarks on the command line and in the Python API: a pass that matches nothing it targets says so,
`--remarks[=REGEX]` prints every remark, `--strict` fails on a missed one (exit 1, one line, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optc.ir import save_model
from tests.cli.cli_support import Job, listing, run_in_process, run_many, snapshot

pytest.importorskip("torch")
pytest.importorskip("transformers")

HEADS = "prune-heads: no attention blocks found"
CALIB = ["--calib", "random", "--calib-samples", "2", "--calib-seqlen", "8"]


def _model(folder: Path, kind: str) -> Path:
    from tests.fixtures import prune_models as pm

    folder.mkdir()
    path = folder / f"{kind}.onnx"
    save_model(_perceptron() if kind == "mlp" else pm.load(kind), path)
    return path


def _perceptron():
    """Two linear layers and a Relu: no attention block."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from optc.ir import from_proto

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (8, 16)), ("w2", (16, 4)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    return from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("remarks")
    jobs: dict[str, Job] = {}

    def job(name: str, kind: str, *args: str) -> None:
        folder = root / name
        model = _model(folder, kind)
        jobs[name] = Job([model.name, "-o", "out.onnx", "--no-runtime-check", *args], folder)

    job("mlp", "mlp", "--passes=prune-heads")
    job("mlp-strict", "mlp", "--passes=prune-heads", "--strict")
    job("phi3", "phi3", "--passes=prune-heads{ratio=0.5}", "--remarks=prune", "--strict", *CALIB)
    job("llama-remarks", "llama", "--passes=prune-heads{ratio=0.5}", "--remarks=heads", "--strict", *CALIB)
    job("llama-quiet", "llama", "--passes=prune-heads{ratio=0.5}", *CALIB)
    before = {name: snapshot(j.cwd) for name, j in jobs.items()}
    results = run_many(jobs)
    return {name: (results[name], jobs[name].cwd, before[name]) for name in jobs}


def test_a_pass_that_matches_nothing_prints_one_remark_line(runs):
    run, folder, _ = runs["mlp"]
    assert run.returncode == 0, run
    assert run.stderr_lines == [f"optc: remark: {HEADS}"], run
    assert (folder / "out.onnx").is_file()


def test_fused_projections_are_split_and_pruned_under_strict(runs):
    """Phi-3's fused qkv_proj: prune-heads splits it first (the canonical form), then prunes; nothing is missed."""
    run, folder, _ = runs["phi3"]
    assert run.returncode == 0, run
    assert run.stderr_lines == [
        "optc: remark: prune-heads: split 4 fused projections into 10 linear layers",
        "optc: remark: prune-heads: removed 4 heads in 2 of 2 attention blocks",
    ], run
    assert (folder / "out.onnx").is_file()


def test_strict_fails_on_the_remark_and_writes_nothing(runs):
    run, folder, before = runs["mlp-strict"]
    assert run.returncode == 1, run
    assert run.stderr_lines == [f"optc: error: --strict: {HEADS}"], run
    assert run.stdout == ""
    assert snapshot(folder) == before  # the input unchanged, no output, no reproducer, no temporary file


def test_remarks_prints_what_the_named_passes_did_and_strict_passes_a_clean_run(runs):
    run, folder, _ = runs["llama-remarks"]
    assert run.returncode == 0, run
    assert run.stderr_lines == ["optc: remark: prune-heads: removed 4 heads in 2 of 2 attention blocks"], run
    quiet, _, _ = runs["llama-quiet"]
    assert quiet.returncode == 0 and quiet.stderr == "", quiet


def test_a_bad_remarks_filter_is_a_usage_error(tmp_path):
    model = _model(tmp_path / "m", "llama")
    before = snapshot(model.parent)
    run = run_in_process(Job([model.name, "-o", "out.onnx", "--remarks=("], model.parent))
    assert run.returncode == 2, run
    assert len(run.stderr_lines) == 1 and run.stderr.startswith("optc: error: --remarks: invalid regular expression '('")
    assert snapshot(model.parent) == before


def test_bare_remarks_keeps_the_input_positional(tmp_path):
    model = _model(tmp_path / "m", "mlp")
    run = run_in_process(Job(["--remarks", model.name, "-o", "out.onnx", "--passes=prune-heads", "--no-runtime-check"],
                             model.parent))
    assert run.returncode == 0, run
    assert run.stderr_lines == [f"optc: remark: {HEADS}"], run
    assert (model.parent / "out.onnx").is_file()


def test_python_api_returns_the_remarks_and_strict_raises(tmp_path, capsys):
    import optc
    from optc.passes import Remark, RemarkError

    model = _model(tmp_path / "m", "mlp")
    out = tmp_path / "out.onnx"
    result = optc.compile(model, output=out, passes="prune-heads")
    assert result.remarks == [Remark("prune-heads", "missed", HEADS.split(": ", 1)[1], matched_none=True)]
    assert result.as_dict()["remarks"][0] == {"pass": "prune-heads", "kind": "missed",
                                              "message": HEADS.split(": ", 1)[1], "matched_none": True}
    assert capsys.readouterr().err.splitlines() == [f"optc: remark: {HEADS}"]
    out.unlink()
    before = listing(tmp_path)
    with pytest.raises(RemarkError, match="--strict: prune-heads"):
        optc.compile(model, output=out, passes="prune-heads", strict=True)
    assert listing(tmp_path) == before
