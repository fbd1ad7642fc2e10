"""Remarks on the command line and in the Python API: a pass that matches nothing it targets says so,
`--remarks[=REGEX]` prints every remark, `--strict` fails on a missed one (exit 1, one line, nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optc.ir import save_model
from tests.cli.cli_support import Job, listing, run_in_process, run_many, snapshot

pytest.importorskip("torch")
pytest.importorskip("transformers")

HEADS = "prune-heads: 0 of 2 attention blocks matched: fused qkv_proj"
FFN = "prune-ffn: 0 of 2 MLP blocks matched: fused gate_up_proj"
CALIB = ["--calib", "random", "--calib-samples", "2", "--calib-seqlen", "8"]


def _model(folder: Path, kind: str) -> Path:
    from tests.fixtures import prune_models as pm

    folder.mkdir()
    path = folder / f"{kind}.onnx"
    save_model(pm.load(kind), path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("remarks")
    jobs: dict[str, Job] = {}

    def job(name: str, kind: str, *args: str) -> None:
        folder = root / name
        model = _model(folder, kind)
        jobs[name] = Job([model.name, "-o", "out.onnx", "--no-runtime-check", *args], folder)

    job("phi3", "phi3", "--passes=prune-heads,prune-ffn")
    job("phi3-strict", "phi3", "--passes=prune-heads,prune-ffn", "--strict")
    job("llama-remarks", "llama", "--passes=prune-heads{ratio=0.5}", "--remarks=heads", "--strict", *CALIB)
    job("llama-quiet", "llama", "--passes=prune-heads{ratio=0.5}", *CALIB)
    before = {name: snapshot(j.cwd) for name, j in jobs.items()}
    results = run_many(jobs)
    return {name: (results[name], jobs[name].cwd, before[name]) for name in jobs}


def test_a_pass_that_matches_nothing_prints_one_remark_line(runs):
    run, folder, _ = runs["phi3"]
    assert run.returncode == 0, run
    assert run.stderr_lines == [f"optc: remark: {HEADS}", f"optc: remark: {FFN}"], run
    assert (folder / "out.onnx").is_file()


def test_strict_fails_on_the_remark_and_writes_nothing(runs):
    run, folder, before = runs["phi3-strict"]
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
    model = _model(tmp_path / "m", "phi3")
    run = run_in_process(Job(["--remarks", model.name, "-o", "out.onnx", "--passes=prune-heads", "--no-runtime-check"],
                             model.parent))
    assert run.returncode == 0, run
    assert run.stderr_lines == [f"optc: remark: {HEADS}"], run
    assert (model.parent / "out.onnx").is_file()


def test_python_api_returns_the_remarks_and_strict_raises(tmp_path, capsys):
    import optc
    from optc.passes import Remark, RemarkError

    model = _model(tmp_path / "m", "phi3")
    out = tmp_path / "out.onnx"
    result = optc.compile(model, output=out, passes="prune-heads,prune-ffn")
    assert result.remarks == [
        Remark("prune-heads", "missed", HEADS.split(": ", 1)[1], matched_none=True),
        Remark("prune-ffn", "missed", FFN.split(": ", 1)[1], matched_none=True),
    ]
    assert result.as_dict()["remarks"][0] == {"pass": "prune-heads", "kind": "missed",
                                              "message": HEADS.split(": ", 1)[1], "matched_none": True}
    assert capsys.readouterr().err.splitlines() == [f"optc: remark: {HEADS}", f"optc: remark: {FFN}"]
    out.unlink()
    before = listing(tmp_path)
    with pytest.raises(RemarkError, match="--strict: prune-heads"):
        optc.compile(model, output=out, passes="prune-heads", strict=True)
    assert listing(tmp_path) == before
