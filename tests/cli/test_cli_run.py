"""Runs that succeed, what the instruments print, the informational commands, and failures inside a run.

The child processes of this module start together (`runs`); each test checks one.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.cli_support import (
    Job,
    assert_same_outputs,
    list_passes_entries,
    listing,
    run_in_process,
    run_many,
    snapshot,
)
from tests.fixtures.mlp_file import build_model

PRINT_PIPELINE_IN = " cse{constant-bytes=65536} , fixpoint{max-iterations=3}( dce, cse{ constant-bytes=8 } ),cleanup"
PRINT_PIPELINE_OUT = "cse,fixpoint{max-iterations=3}(dce,cse{constant-bytes=8}),fixpoint(fold-constants,cse,dce),topo-sort"
SENTINEL = b"an earlier output that a failed run must leave alone\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, failing_plugin: Path):
    """Every child run of this module, started at once; by name: (Run, its folder, its files' hashes before)."""
    jobs: dict[str, Job] = {}

    def job(name: str, *args: str, plugin: bool = False, external_data: str | None = None) -> Path:
        folder = tmp_path_factory.mktemp(name)
        build_model(folder / "model.onnx", external_data=external_data)
        jobs[name] = Job(args, folder, [failing_plugin] if plugin else [])
        return folder

    job("default", "model.onnx", "-o", "out.onnx", "--report", "report.json", external_data="model.onnx.data")
    job(
        "instruments", "model.onnx", "--passes=cse,dce,topo-sort", "-o", "out.onnx",
        "--timing", "--statistics", "--verify-each", "--print-ir-after-change",
    )
    job("pass-failure", "model.onnx", "--passes=dce,raise-error", "-o", "out.onnx", plugin=True)
    job("verify-each-failure", "model.onnx", "--passes=cse,break-ir,dce", "-o", "out.onnx", "--verify-each", plugin=True)
    rejected = job("runtime-rejects", "model.onnx", "--passes=foreign-op", "-o", "out.onnx", plugin=True)
    (rejected / "out.onnx").write_bytes(SENTINEL)
    debug = job("debug", "notes.onnx", "-o", "out.onnx", "--debug")
    (debug / "notes.onnx").write_text("not a model\n")
    job("list-passes", "--list-passes")
    job("print-pipeline", "--print-pipeline", f"--passes={PRINT_PIPELINE_IN}")

    before = {name: snapshot(j.cwd) for name, j in jobs.items()}
    results = run_many(jobs)
    return {name: (results[name], jobs[name].cwd, before[name]) for name in jobs}


def _unchanged(folder: Path, before: dict[str, str]) -> bool:
    """Everything that was in `folder` before the run is still there, byte for byte."""
    now = snapshot(folder)
    return all(now.get(p) == h for p, h in before.items())


def test_compile_writes_an_equivalent_model_and_a_report(runs) -> None:
    """The default pipeline on a model with external data, with --report."""
    run, folder, before = runs["default"]
    assert run.returncode == 0, run
    assert run.stderr == "", run
    assert run.stdout.startswith("optc: wrote out.onnx [ort]: nodes 8 -> "), run
    assert "optc: check: onnxruntime" in run.stdout
    assert _unchanged(folder, before)  # model.onnx and model.onnx.data
    assert listing(folder) == {"model.onnx", "model.onnx.data", "out.onnx", "out.onnx.data", "report.json"}
    assert_same_outputs(folder / "model.onnx", folder / "out.onnx")

    report = json.loads((folder / "report.json").read_text())
    assert report["pipeline"] == "fixpoint(fold-constants,cse,dce),topo-sort"
    assert report["target"] == "ort"
    assert Path(report["output"]).name == "out.onnx"
    assert report["nodes_before"] == 8
    assert report["nodes_after"] < 8  # the dead Neg and the constant Add are gone
    assert report["output_bytes"] == (folder / "out.onnx").stat().st_size + (folder / "out.onnx.data").stat().st_size
    assert any("onnxruntime" in check for check in report["checks"])
    assert {row["name"] for row in report["timing"]} >= {"fold-constants", "cse", "dce", "topo-sort"}
    # The ort backend's legalization (OrtBackend.legalize) runs after the pipeline.
    assert [row["pass"] for row in report["statistics"]][-4:] == ["fuse-ort", "lower-ort-fp8", "lower-ort-nbits", "lower-ort-int8"]


def test_timing_statistics_verify_each_and_print_ir_after_change(runs) -> None:
    run, folder, _ = runs["instruments"]
    assert run.returncode == 0, run
    err = run.stderr
    # --print-ir-after-change: only dce changed the IR (cse found nothing, topo-sort kept the order).
    assert err.count("// -----// IR Dump After ") == 1, err
    dump = err.split("// -----// IR Dump After dce //----- //\n")[1].split("===-- optc timing report")[0]
    assert "[matmul] mm = MatMul (x1, w)" in dump
    assert "dead_neg" not in dump
    # --timing: one row per pass (the ort backend's legalization last), then the total.
    timing = err[err.index("===-- optc timing report"):err.index("===-- optc pass statistics")]
    assert [line.split()[-1] for line in timing.splitlines()[2:]] == ["cse", "dce", "topo-sort", "fuse-ort", "lower-ort-fp8", "lower-ort-nbits", "lower-ort-int8", "total"]
    # --statistics: node counts and each pass's counters.
    assert "cse: nodes 8 -> 8, nodes-merged=0, initializers-merged=0" in err
    assert "dce: nodes 8 -> 7, nodes-removed=1" in err
    # --verify-each passed quietly; the result still computes the same.
    assert_same_outputs(folder / "model.onnx", folder / "out.onnx")


def test_pass_failure_writes_a_reproducer_and_no_output(runs) -> None:
    run, folder, before = runs["pass-failure"]
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1 and "Traceback" not in run.stderr, run
    reproducer = folder / "out.onnx.reproducer.txt"
    assert run.stderr_lines[0] == (
        f"optc: error: pass 'raise-error' failed (after dce): boom from raise-error (reproducer: {reproducer.name})"
    )
    assert listing(folder) == {"model.onnx", reproducer.name}
    assert _unchanged(folder, before)
    text = reproducer.read_text()
    assert "# failed pass: raise-error" in text
    assert "# passes before it: dce" in text
    assert "RuntimeError('boom from raise-error')" in text
    assert f"input: {(folder / 'model.onnx').resolve()}" in text
    assert "pipeline: dce,raise-error" in text
    assert "optc " in text and "--verify-each --debug" in text


def test_verify_each_names_the_pass_that_broke_the_ir(runs) -> None:
    run, folder, _ = runs["verify-each-failure"]
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1 and "Traceback" not in run.stderr, run
    line = run.stderr_lines[0]
    assert line.startswith(
        "optc: error: pass 'break-ir' failed (after cse): IR verification failed after pass 'break-ir': "
    ), line
    assert line.endswith("(reproducer: out.onnx.reproducer.txt)"), line
    assert listing(folder) == {"model.onnx", "out.onnx.reproducer.txt"}


def test_runtime_rejection_keeps_the_previous_output(runs) -> None:
    run, folder, before = runs["runtime-rejects"]
    assert run.returncode == 1, run
    assert len(run.stderr_lines) == 1 and "Traceback" not in run.stderr, run
    assert run.stderr_lines[0].startswith("optc: error: onnxruntime rejected the lowered model: "), run
    assert listing(folder) == {"model.onnx", "out.onnx"}  # no staging folder left behind
    assert (folder / "out.onnx").read_bytes() == SENTINEL and _unchanged(folder, before)


def test_debug_shows_the_traceback(runs) -> None:
    run, folder, _ = runs["debug"]
    assert run.returncode == 1, run
    assert "Traceback (most recent call last)" in run.stderr
    assert "ModelLoadError" in run.stderr
    assert run.stderr_lines[-1].startswith("optc: error: notes.onnx: not an ONNX model"), run
    assert not (folder / "out.onnx").exists()


def test_debug_keeps_the_usage_exit_code(tmp_path: Path) -> None:
    build_model(tmp_path / "model.onnx")
    run = run_in_process(Job(["model.onnx", "-o", "out.onnx", "--passes=dcee", "--debug"], tmp_path))
    assert run.returncode == 2, run
    assert "Traceback (most recent call last)" in run.stderr
    assert run.stderr_lines[-1].startswith("optc: error: unknown pass 'dcee'"), run


def test_print_pipeline_is_canonical(runs) -> None:
    from optc.passes import parse_pipeline

    run, _, _ = runs["print-pipeline"]
    assert run.returncode == 0, run
    assert run.stdout == PRINT_PIPELINE_OUT + "\n"
    assert run.stderr == ""
    assert parse_pipeline(PRINT_PIPELINE_OUT).pipeline_text() == PRINT_PIPELINE_OUT


def test_print_pipeline_needs_a_pipeline(tmp_path: Path) -> None:
    run = run_in_process(Job(["--print-pipeline"], tmp_path))
    assert run.returncode == 2 and run.stderr == "optc: error: --print-pipeline needs --passes PIPELINE\n", run


def test_list_passes_shows_every_pass_with_its_summary_and_options(runs) -> None:
    from optc.passes import all_passes, all_pipelines
    from optc.passes.infra.options import describe_options

    run, _, _ = runs["list-passes"]
    assert run.returncode == 0 and run.stderr == "", run
    entries = list_passes_entries(run.stdout)
    for name, cls in all_passes().items():
        assert cls.summary(), f"pass {name} has no one-line summary (its docstring's first line)"
        assert name in entries, f"{name} missing from --list-passes:\n{run.stdout}"
        line, *options = entries[name]
        assert cls.summary() in line
        assert [o.split("=")[0] for o in options] == [row[0] for row in describe_options(cls.Options)], name
    for name, pipeline in all_pipelines().items():
        per_target = [f"= {text}   (for --target {target})" for target, text in sorted(pipeline.targets.items())]
        assert entries[name] == [entries[name][0], f"= {pipeline.text}", *per_target]
        assert pipeline.summary in entries[name][0]
    assert any(p.targets for p in all_pipelines().values()), "no named pipeline has a target's own text"


def test_print_pipeline_expands_for_the_outputs_target(tmp_path: Path) -> None:
    gguf = run_in_process(Job(["--print-pipeline", "--passes=w3a16", "-o", "x.gguf"], tmp_path))
    assert gguf.returncode == 0 and gguf.stdout == "kquant{mix=Q3_K_S imatrix=true}\n", gguf
    explicit = run_in_process(Job(["--print-pipeline", "--passes=w3a16", "--target", "gguf"], tmp_path))
    assert explicit.stdout == gguf.stdout, explicit
    onnx_run = run_in_process(Job(["--print-pipeline", "--passes=w3a16", "-o", "x.onnx"], tmp_path))
    assert onnx_run.returncode == 0 and onnx_run.stdout.startswith("rotate{keep-massive=none},gptq{bits=3"), onnx_run
    assert list(tmp_path.iterdir()) == []


def test_console_script_is_installed_and_runs() -> None:
    """`optc` is a console script: `pip install -e .` puts it beside the interpreter."""
    try:
        scripts = importlib.metadata.distribution("optc").entry_points.select(group="console_scripts")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optc is not installed as a distribution here")
    assert [ep.value for ep in scripts if ep.name == "optc"] == ["optc.cli:main"]
    script = shutil.which("optc", path=str(Path(sys.executable).parent)) or shutil.which("optc")
    assert script, "the optc console script is not installed"
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("optc "), proc
