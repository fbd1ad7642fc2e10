"""Golden tests: text IR in, pipeline, text IR out, checked by CHECK lines or exactly (one test per case;
format in README.md).

Regenerate exact expected sections with `python tools/update_golden.py` and review the diff;
`python tools/update_golden.py --print FILE` shows what CHECK lines are matched against.
"""

from __future__ import annotations

import difflib
import importlib.util
import re

import pytest

from optc.passes import all_passes, parse_pipeline
from tests.golden.filecheck import CheckFailure, check
from tests.golden.golden_harness import (
    EXPECTED,
    GOLDEN_DIR,
    OUTPUT_PREFIX,
    STDERR_PREFIX,
    UNCHANGED,
    GoldenFormatError,
    golden_files,
    read_golden,
    render,
    run_case,
)

TOOL = GOLDEN_DIR.parent.parent / "tools" / "update_golden.py"


def _params() -> list:
    params = []
    for path in golden_files():
        rel = path.relative_to(GOLDEN_DIR).with_suffix("").as_posix()
        try:
            golden = read_golden(path)
        except GoldenFormatError as exc:
            params.append(pytest.param(None, None, exc, id=f"{rel}:format"))
            continue
        for case in golden.cases:
            # A case that documents a known bug fails until the bug is fixed; then it must lose its XFAIL.
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
            params.append(pytest.param(golden, case, None, id=f"{rel}:{case.name}", marks=marks))
    return params


def _diff(expected: str, actual: str, where: str) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(keepends=True),
        actual.splitlines(keepends=True),
        fromfile=f"{where} (expected)",
        tofile=f"{where} (actual)",
    )
    return "".join(lines)


@pytest.mark.parametrize(("golden", "case", "format_error"), _params())
def test_golden(golden, case, format_error):
    if format_error is not None:
        pytest.fail(str(format_error), pytrace=False)
    root = GOLDEN_DIR.parent.parent
    shown = golden.path.relative_to(root) if golden.path.is_relative_to(root) else golden.path
    where = f"{shown}:{case.line} ({case.name})"
    outcome = run_case(golden.pipeline, case, golden.config)
    hint = "run `python tools/update_golden.py` and review the diff"
    if case.expected_error is not None:
        assert outcome.error is not None, f"{where}: expected an error containing {case.expected_error!r}, the pipeline succeeded"
        assert case.expected_error in outcome.error, f"{where}: error {outcome.error!r} lacks {case.expected_error!r}"
        return
    assert outcome.error is None, f"{where}: {outcome.error}"
    if case.is_check_case:
        failure = None
        try:
            check(case.directives(OUTPUT_PREFIX), outcome.text, "<output>")
            check(case.directives(STDERR_PREFIX), outcome.stderr, "<stderr>")
        except CheckFailure as exc:
            failure = f"{where}:\n{exc}"
        if failure is not None:
            pytest.fail(failure, pytrace=False)
        if case.unchanged and outcome.text != outcome.input_printed:
            diff = _diff(outcome.input_printed, outcome.text, where)
            pytest.fail(f"{where}: marked `{UNCHANGED}` but the pipeline changed the IR:\n{diff}", pytrace=False)
    else:
        assert case.expected is not None, f"{where}: no `{EXPECTED}` section or CHECK lines; {hint}"
        if outcome.text != case.expected:
            pytest.fail(f"{where}: output differs ({hint}):\n{_diff(case.expected, outcome.text, where)}", pytrace=False)
    # A pass that changes the IR must say so (analyses are invalidated from it), and one that
    # does not must not (fixpoint would loop to its bound).
    changed = outcome.text != outcome.input_printed
    assert outcome.modified == changed, (
        f"{where}: the pipeline reported modified={outcome.modified} but the IR {'changed' if changed else 'did not change'}"
    )


def test_golden_dirs_name_registered_passes():
    """`tests/golden/<pass>/`: the folder names a pass, and each file's pipeline parses and uses it."""
    passes = all_passes()
    files = golden_files()
    assert files, "no golden files found"
    for path in files:
        folder = path.parent.name
        assert folder in passes, f"{path}: folder {folder!r} is not a registered pass"
        golden = read_golden(path)
        text = parse_pipeline(golden.pipeline).pipeline_text()
        assert folder in text, f"{path}: pipeline {golden.pipeline!r} does not run {folder!r}"


def _builtin_passes() -> list[str]:
    """Registered passes that ship with optc (installed plugins test themselves)."""
    return [name for name, cls in all_passes().items() if cls.__module__.startswith("optc.")]


@pytest.mark.parametrize("pass_name", _builtin_passes())
def test_every_registered_pass_has_golden_cases_with_check_lines(pass_name):
    """Each built-in pass has `tests/golden/<pass>/` with at least one case checked by CHECK lines."""
    files = sorted((GOLDEN_DIR / pass_name).glob("*.onnxtxt"))
    assert files, f"pass {pass_name!r} is registered but has no golden cases: add tests/golden/{pass_name}/<topic>.onnxtxt"
    try:
        cases = [case for path in files for case in read_golden(path).cases]
    except GoldenFormatError as exc:
        pytest.fail(str(exc), pytrace=False)
    assert any(case.checks and not case.xfail for case in cases), (
        f"pass {pass_name!r}: no golden case under tests/golden/{pass_name}/ is written with CHECK lines"
    )


def _load_tool():
    spec = importlib.util.spec_from_file_location("update_golden", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MIXED = (
    "# RUN: --passes='cse'\n"
    "# -----\n# CASE: exact\n"
    '<ir_version: 10, opset_import: ["" : 21]>\n'
    "g (float[2] x) => (float[2] y) {\n  a = Neg(x)\n  b = Neg(x)\n  y = Add(a, b)\n}\n"
    "# EXPECTED:\n"
    '<\n   ir_version: 10,\n   opset_import: ["" : 21]\n>\n'
    "g (float[2] x) => (float[2] y) {\n   a = Neg (x)\n   y = Add (a, a)\n}\n"
    "\n# -----\n# CASE: checked\n"
    '<ir_version: 10, opset_import: ["" : 21]>\n'
    "g (float[2] x) => (float[2] y) {\n  a = Neg(x)\n  b = Neg(x)\n  y = Add(a, b)\n}\n"
    "# A comment among the checks, and a check the tool must not rewrite.\n"
    "# CHECK: y = Add (a, a)\n"
    "# STDERR: nodes-merged=1\n"
)


def test_update_tool_fills_in_and_checks(tmp_path, capsys):
    """tools/update_golden.py writes a file's exact expected sections back from its inputs alone,
    leaves CHECK cases as written, and `--check` reports a stale file without touching it."""
    tool = _load_tool()
    original = tmp_path / "original.onnxtxt"
    original.write_text(_MIXED)
    golden = read_golden(original)
    assert [case.is_check_case for case in golden.cases] == [False, True]
    for case in golden.cases:
        case.expected = None
    stale = render(golden, {})
    assert EXPECTED not in stale
    assert "# CHECK: y = Add (a, a)\n# STDERR: nodes-merged=1\n" in stale
    path = tmp_path / "stale.onnxtxt"
    path.write_text(stale)
    assert tool.main(["--check", str(path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert path.read_text() == stale
    assert tool.main([str(path)]) == 0
    assert path.read_text() == _MIXED
    assert tool.main(["--check", str(path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original.onnxtxt", "stale.onnxtxt"]


def test_update_tool_prints_what_checks_match(tmp_path, capsys):
    """`--print` writes nothing and shows each case's output and its stderr and statistics."""
    tool = _load_tool()
    path = tmp_path / "mixed.onnxtxt"
    path.write_text(_MIXED)
    assert tool.main(["--print", str(path), "--case", "checked"]) == 0
    out = capsys.readouterr().out
    assert "(checked) modified=True" in out
    assert "   y = Add (a, a)" in out
    assert "cse: nodes 3 -> 2, nodes-merged=1" in out
    assert "(exact)" not in out
    assert path.read_text() == _MIXED
    assert tool.main(["--print", str(path), "--case", "missing"]) == 1
    assert "no case named missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--case", "checked", str(path)])
    assert exit_info.value.code == 2
    assert "--case goes with --print" in capsys.readouterr().err


def test_update_tool_keeps_failing_cases_for_a_human(tmp_path, capsys):
    """A case that fails without `# EXPECTED-ERROR:` is reported, not recorded as expected."""
    tool = _load_tool()
    path = tmp_path / "broken.onnxtxt"
    text = (
        "# RUN: --passes='topo-sort'\n# -----\n# CASE: cycle\n"
        '<ir_version: 10, opset_import: ["" : 21]>\n'
        "g (float[2] x) => (float[2] y) {\n  a = Add(x, b)\n  b = Neg(a)\n  y = Relu(a)\n}\n"
    )
    path.write_text(text)
    assert tool.main([str(path)]) == 1
    assert "the pipeline failed" in capsys.readouterr().err
    assert path.read_text() == text


_HEAD = '<ir_version: 10, opset_import: ["" : 21]>\ng (float[2] x) => (float[2] y) { y = Neg(x) }\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# -----\n# CASE: a\n" + _HEAD, "first line must be"),
        ("# RUN: --passes='dce' --verify\n# -----\n# CASE: a\n" + _HEAD, "optionally --calib="),
        ("# RUN: --passes='dce' --calib-samples=two\n# -----\n# CASE: a\n" + _HEAD, "whole number"),
        ("# RUN: --passes='dce'\n", "no cases"),
        ("# RUN: --passes='dce'\n" + _HEAD, "only comments"),
        ("# RUN: --passes='dce'\n# -----\n" + _HEAD, "must start with `# CASE:"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: Bad_Name\n" + _HEAD, "lowercase"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# -----\n# CASE: a\n" + _HEAD, "used twice"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# EXPECTED:\n" + _HEAD + "# EXPECTED:\n", "two expected"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# EXPECTED-ERROR: x\n" + _HEAD, "nothing may follow"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# CHECK: Neg\n# EXPECTED:\n" + _HEAD, "mixes an expected"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# CHECK: Neg\n" + _HEAD, "only CHECK lines and comments"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# UNCHANGED\n# UNCHANGED\n", "written twice"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# CHECK-NXT: Neg\n", "bad.onnxtxt:6: unknown directive"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# STDERR-NOT [[X:a]]\n", "malformed directive"),
        ("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# XFAIL:\n# UNCHANGED\n", "names the bug"),
    ],
)
def test_format_errors_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.onnxtxt"
    path.write_text(text)
    with pytest.raises(GoldenFormatError, match=re.escape(message)):
        read_golden(path)


def test_mismatch_shows_a_diff(tmp_path):
    path = tmp_path / "stale.onnxtxt"
    path.write_text("# RUN: --passes='dce'\n# -----\n# CASE: a\n" + _HEAD + "# EXPECTED:\n" + _HEAD)
    golden = read_golden(path)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)output differs.*\+\+\+ .*-g \(float\[2\] x\)"):
        test_golden(golden, golden.cases[0], None)


def _case(tmp_path, checks: str, run: str = "# RUN: --passes='dce'\n"):
    path = tmp_path / "case.onnxtxt"
    path.write_text(run + "# -----\n# CASE: a\n" + _HEAD + checks)
    golden = read_golden(path)
    return golden, golden.cases[0]


def test_check_lines_pass_and_fail_naming_the_directive(tmp_path):
    golden, case = _case(tmp_path, "# CHECK: y = Neg (x)\n# CHECK-NOT: Relu\n# STDERR: dce: nodes 1 -> 1\n")
    assert case.is_check_case and case.expected is None
    test_golden(golden, case, None)
    golden, case = _case(tmp_path, "# comment\n# CHECK: y = Neg (x)\n# CHECK-NEXT: y = Relu\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)case.onnxtxt:8: error: CHECK-NEXT: expected string not found"
                                                   r".*scanning from line"):
        test_golden(golden, case, None)


def test_stderr_lines_read_the_statistics(tmp_path):
    golden, case = _case(tmp_path, "# STDERR: nodes-removed=5\n")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)case.onnxtxt:6: error: STDERR: .*<stderr>.*nodes-removed=0"):
        test_golden(golden, case, None)


def test_unchanged_fails_with_a_diff_when_the_pass_rewrites(tmp_path):
    text = (
        "# RUN: --passes='cse'\n# -----\n# CASE: a\n"
        '<ir_version: 10, opset_import: ["" : 21]>\n'
        "g (float[2] x) => (float[2] y) {\n  a = Neg(x)\n  b = Neg(x)\n  y = Add(a, b)\n}\n# UNCHANGED\n"
    )
    path = tmp_path / "case.onnxtxt"
    path.write_text(text)
    golden = read_golden(path)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)marked `# UNCHANGED` but the pipeline changed the IR.*-   b = Neg"):
        test_golden(golden, golden.cases[0], None)
    golden, case = _case(tmp_path, "# UNCHANGED\n")
    test_golden(golden, case, None)


def test_the_readme_example_is_a_passing_golden_file(tmp_path):
    """The example in README.md is a golden file that passes as written."""
    readme = (GOLDEN_DIR / "README.md").read_text()
    example = readme.split("```\n", 2)[1]
    assert example.startswith("# RUN:") and "# CHECK" in example and "# UNCHANGED" in example
    path = tmp_path / "example.onnxtxt"
    path.write_text(example)
    golden = read_golden(path)
    assert len(golden.cases) == 2
    for case in golden.cases:
        test_golden(golden, case, None)
