"""Bad command lines and bad inputs: one `optc: error:` line, the right exit code, nothing written.

Contract: exit 2 for usage errors (unknown flag, pass or option, ill-typed
option, pipeline syntax), 1 for every other failure; exactly one line on
stderr naming what was wrong; no traceback without --debug; no output and no
temporary file left behind; the input untouched.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from tests.cli.cli_support import (
    Job,
    assert_clean_failure,
    run_in_process,
    run_many,
    snapshot,
)
from tests.fixtures.mlp_file import build_model


@dataclasses.dataclass
class Case:
    #: Creates what the case needs in an empty folder and returns optc's arguments.
    setup: Callable[[Path], list[str]]
    exit_code: int
    #: Text the error line must contain (case-insensitive).
    mentions: list[str]
    #: Needs the example plugin installed.
    plugin: bool = False


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return path.name


def _model(d: Path) -> str:
    return build_model(d / "model.onnx").name


def _compile(*extra: str) -> Callable[[Path], list[str]]:
    """`optc model.onnx -o out.onnx EXTRA...` on the tiny model."""
    return lambda d: [_model(d), "-o", "out.onnx", *extra]


def _truncated(d: Path) -> list[str]:
    data = build_model(d / "whole.onnx").read_bytes()
    (d / "whole.onnx").unlink()
    return [_write(d / "cut.onnx", data[: len(data) // 2]), "-o", "out.onnx"]  # cut inside the graph


def _directory(d: Path) -> list[str]:
    (d / "folder.onnx").mkdir()
    return ["folder.onnx", "-o", "out.onnx"]


def _literal_option_case() -> Case:
    """A Literal-typed option given a value outside its allowed ones.

    Uses the first built-in pass with such an option; while there is none, the
    example plugin's `drop-identity{graph-outputs=keep|rewire}`.
    """
    from optc.passes import all_passes
    from optc.passes.infra.options import to_kebab
    from optc.passes.infra.registry import plugin_origin

    for name, cls in all_passes().items():
        if plugin_origin(name):
            continue
        for field, tp in typing.get_type_hints(cls.Options).items():
            if typing.get_origin(tp) is typing.Literal:
                option, allowed = to_kebab(field), [str(a) for a in typing.get_args(tp)]
                return Case(_compile(f"--passes={name}{{{option}=not-allowed}}"), 2, [f"'{option}'", *allowed])
    return Case(
        _compile("--passes=drop-identity{graph-outputs=not-allowed}"), 2,
        ["'drop-identity'", "'graph-outputs'", "keep, rewire", "'not-allowed'"], plugin=True,
    )


#: Run as child processes of the real program.
CASES: dict[str, Case] = {
    "missing-file": Case(lambda d: ["missing.onnx", "-o", "out.onnx"], 1, ["missing.onnx", "no such file"]),
    "text-file": Case(
        lambda d: [_write(d / "notes.onnx", b"these are notes, not a model\n"), "-o", "out.onnx"], 1,
        ["notes.onnx", "not an ONNX model"],
    ),
    "truncated-file": Case(_truncated, 1, ["cut.onnx", "truncated"]),
    "empty-file": Case(lambda d: [_write(d / "empty.onnx", b""), "-o", "out.onnx"], 1, ["empty.onnx", "empty"]),
    "directory": Case(_directory, 1, ["folder.onnx", "directory"]),
    "unknown-pass": Case(_compile("--passes=cse,dcee"), 2, ["unknown pass 'dcee'", "did you mean 'dce'"]),
    "unknown-option": Case(
        _compile("--passes=cse{constnt-bytes=1}"), 2, ["'cse'", "'constnt-bytes'", "did you mean 'constant-bytes'"],
    ),
    "ill-typed-option": Case(
        _compile("--passes=cse{constant-bytes=lots}"), 2, ["'cse'", "'constant-bytes'", "an int", "'lots'"],
    ),
    "option-not-allowed": _literal_option_case(),
    "pipeline-syntax": Case(_compile("--passes=cse,,dce"), 2, ["syntax error", "column 5"]),
    "unknown-flag": Case(_compile("--bogus"), 2, ["--bogus"]),
    "missing-output": Case(lambda d: [_model(d)], 2, ["-o"]),
    "unknown-output-suffix": Case(lambda d: [_model(d), "-o", "out.txt"], 2, ["'.txt'", "--target"]),
    "output-is-input": Case(lambda d: [_model(d), "-o", "model.onnx"], 1, ["model.onnx", "overwrite the input"]),
}


def _external_clash(d: Path) -> list[str]:
    # The input keeps its weights in out.onnx.data, exactly where `-o out.onnx` would put the output's.
    build_model(d / "ext.onnx", external_data="out.onnx.data")
    return ["ext.onnx", "-o", "out.onnx"]


def _output_is_input_data(d: Path) -> list[str]:
    # The input's weights live in a file with an ONNX name, which `-o` then names.
    build_model(d / "ext.onnx", external_data="weights.onnx")
    return ["ext.onnx", "--target", "ort", "-o", "weights.onnx"]


def _ill_typed_annotation(d: Path) -> list[str]:
    # A node carries optc's quantization annotation as a string, where the schema wants an object.
    path = build_model(d / "model.onnx")
    proto = onnx.load(path)
    proto.graph.node[0].metadata_props.add(key="optc.quant", value='"int8"')
    onnx.save(proto, path)
    return ["model.onnx", "-o", "out.onnx"]


def _output_is_directory(d: Path) -> list[str]:
    (d / "out.onnx").mkdir()
    return [_model(d), "-o", "out.onnx"]


#: More of the same through `optc.cli.main` in this process: the code path of a child, without its start-up.
EDGE_CASES: dict[str, Case] = {
    "option-out-of-range": Case(_compile("--passes=fixpoint{max-iterations=0}(dce)"), 2, ["'fixpoint'", "max-iterations"]),
    "unterminated-options": Case(_compile("--passes=cse{constant-bytes=1"), 2, ["column 21", "'}'"]),
    "unknown-analysis": Case(_compile("--passes=require<nothing>"), 2, ["unknown analysis 'nothing'"]),
    "abbreviated-flag": Case(_compile("--verify"), 2, ["--verify"]),
    "unknown-target": Case(_compile("--target", "tflite"), 2, ["tflite", "ort"]),
    "ill-typed-flag": Case(_compile("--calib-samples", "many"), 2, ["--calib-samples", "many"]),
    "no-calibration-samples": Case(_compile("--calib-samples", "0"), 2, ["--calib-samples"]),
    "no-calibration-data": Case(
        _compile("--passes=quantize{activations=int8}"), 1, ["needs calibration data", "--calib"],
    ),
    "calibration-file-missing": Case(_compile("--calib", "text:corpus.txt"), 1, ["corpus.txt"]),
    "output-is-input-spelled-otherwise": Case(
        lambda d: [_model(d), "-o", str(d / "." / "model.onnx")], 1, ["overwrite the input"],
    ),
    "output-overwrites-input-data": Case(_external_clash, 1, ["out.onnx", "input's data"]),
    "output-is-input-data": Case(_output_is_input_data, 1, ["weights.onnx", "input's data"]),
    "output-is-directory": Case(_output_is_directory, 1, ["out.onnx", "directory"]),
    "ill-typed-annotation": Case(_ill_typed_annotation, 1, ["model.onnx", "'optc.quant'", "must be dict, not str"]),
    "output-folder-missing": Case(lambda d: [_model(d), "-o", "nowhere/out.onnx"], 1, ["nowhere", "does not exist"]),
    "report-folder-missing": Case(_compile("--report", "nowhere/report.json"), 1, ["--report", "nowhere"]),
    "report-is-input": Case(_compile("--report", "model.onnx"), 1, ["--report", "overwrite the input"]),
    "report-is-output": Case(_compile("--report", "out.onnx"), 1, ["--report", "overwrite the output"]),
}


def _prepare(case: Case, folder: Path, plugin_site: Path | None) -> tuple[Job, dict[str, str]]:
    args = case.setup(folder)
    return Job(args, folder, [plugin_site] if case.plugin and plugin_site else []), snapshot(folder)


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """Every case of CASES, run at once, each in its own folder; with the folder's files before the run."""
    plugin_site = request.getfixturevalue("example_plugin") if any(c.plugin for c in CASES.values()) else None
    prepared = {name: _prepare(case, tmp_path_factory.mktemp(name), plugin_site) for name, case in CASES.items()}
    runs = run_many({name: job for name, (job, _) in prepared.items()})
    return {name: (runs[name], job.cwd, files) for name, (job, files) in prepared.items()}


def _check(case: Case, run, folder: Path, files: dict[str, str]) -> None:
    """Nothing written (no output, no temporary file, no report) and nothing modified."""
    assert_clean_failure(run, folder, files, case.exit_code, case.mentions)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(name: str, child_runs) -> None:
    run, folder, files = child_runs[name]
    _check(CASES[name], run, folder, files)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_bad_input_fails_cleanly_in_process(name: str, tmp_path: Path) -> None:
    job, files = _prepare(EDGE_CASES[name], tmp_path, None)
    _check(EDGE_CASES[name], run_in_process(job), tmp_path, files)


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.3, 0.6, 0.9, 0.99])
def test_model_cut_anywhere_fails_cleanly(tmp_path: Path, fraction: float) -> None:
    """A model cut anywhere either still parses and compiles, or fails with one line and writes nothing."""
    data = build_model(tmp_path / "whole.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: max(1, int(len(data) * fraction))])
    run = run_in_process(Job(["cut.onnx", "-o", "out.onnx"], tmp_path))
    written = {p.name for p in tmp_path.iterdir()} - {"whole.onnx", "cut.onnx"}
    if run.returncode == 0:
        assert written == {"out.onnx"}
    else:
        assert run.returncode == 1 and len(run.stderr_lines) == 1, run
        assert run.stderr.startswith("optc: error: cut.onnx: "), run
        assert written == set()
