"""Reading, running and rewriting golden files (`tests/golden/<pass>/*.onnxtxt`).

Shared by `test_golden.py` (which checks) and `tools/update_golden.py` (which
regenerates the exact expected sections). The format is described in README.md here;
the CHECK lines are matched by `filecheck.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import re
import shlex
from pathlib import Path

from optc.errors import OptcError
from optc.ir import parse_text, print_ir, verify
from optc.passes import (
    AnalysisManager,
    PassContext,
    StatisticsInstrument,
    VerifyEach,
    parse_pipeline,
)
from tests.golden.filecheck import (
    CheckFormatError,
    Directive,
    looks_like_directive,
    parse_directive,
)

GOLDEN_DIR = Path(__file__).resolve().parent
RUN = "# RUN:"
SEPARATOR = "# -----"
CASE = "# CASE:"
EXPECTED = "# EXPECTED:"
EXPECTED_ERROR = "# EXPECTED-ERROR:"
UNCHANGED = "# UNCHANGED"
XFAIL = "# XFAIL:"
#: Directive prefixes: CHECK lines match the printed IR, STDERR lines what the pipeline wrote to
#: stderr or logged, followed by its statistics (`<pass>: nodes A -> B, counter=value, ...`).
OUTPUT_PREFIX = "CHECK"
STDERR_PREFIX = "STDERR"
PREFIXES = (OUTPUT_PREFIX, STDERR_PREFIX)
_CASE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class GoldenFormatError(ValueError):
    """A golden file that does not follow the format; names the file and line."""


@dataclasses.dataclass
class Case:
    name: str
    line: int  # 1-based line of the `# CASE:` line
    input_lines: list[str]  # from `# CASE:` up to the expected marker or the first directive, verbatim
    expected: str | None  # printed IR, ending in a newline; None when absent or an error case
    expected_error: str | None  # substring of the error message, for `# EXPECTED-ERROR:` cases
    checks: list[Directive] = dataclasses.field(default_factory=list)  # CHECK and STDERR directives, in order
    unchanged: bool = False  # `# UNCHANGED`: the pipeline must leave the printed IR as it was
    xfail: str | None = None  # `# XFAIL: <bug>`: the checks document a known bug and are expected to fail
    check_lines: list[str] = dataclasses.field(default_factory=list)  # the directive section, verbatim

    @property
    def input_text(self) -> str:
        return "\n".join(self.input_lines) + "\n"

    @property
    def is_check_case(self) -> bool:
        """Checked by directives (and/or `# UNCHANGED`) rather than by an exact or error section."""
        return bool(self.checks) or self.unchanged or self.xfail is not None

    def directives(self, prefix: str) -> list[Directive]:
        return [d for d in self.checks if d.prefix == prefix]


@dataclasses.dataclass
class GoldenFile:
    path: Path
    header: list[str]  # the RUN line and any comments before the first case
    pipeline: str
    cases: list[Case]
    config: dict[str, object] = dataclasses.field(default_factory=dict)  # calibration options of the RUN line


@dataclasses.dataclass
class Outcome:
    """What running one case gave: printed IR or an error, and whether the pipeline said it changed."""

    text: str | None
    error: str | None
    modified: bool
    input_printed: str | None
    stderr: str = ""  # what the pipeline wrote to stderr or logged, then its statistics report


def golden_files(root: Path = GOLDEN_DIR) -> list[Path]:
    return sorted(root.glob("*/*.onnxtxt"))


def read_golden(path: Path) -> GoldenFile:
    lines = path.read_text().splitlines()
    where = f"{path}:1"
    if not lines or not lines[0].startswith(RUN):
        raise GoldenFormatError(f"{where}: the first line must be `{RUN} --passes='<pipeline>'`")
    pipeline, config = _parse_run(lines[0][len(RUN):], where)
    chunks: list[tuple[int, list[str]]] = [(1, [])]
    for number, line in enumerate(lines, start=1):
        if line.rstrip() == SEPARATOR:
            chunks.append((number + 1, []))
        else:
            chunks[-1][1].append(line)
    header = chunks[0][1]
    if any(line.strip() and not line.startswith("#") for line in header):
        raise GoldenFormatError(f"{where}: only comments may come before the first `{SEPARATOR}`")
    cases = [_parse_case(path, start, chunk) for start, chunk in chunks[1:]]
    if not cases:
        raise GoldenFormatError(f"{where}: no cases (each case starts with a `{SEPARATOR}` line)")
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise GoldenFormatError(f"{path}:{case.line}: case name {case.name!r} is used twice")
        seen.add(case.name)
    return GoldenFile(path, header, pipeline, cases, config)


#: RUN-line options besides --passes, as on the command line, and the pass-context key each sets.
_CALIB_OPTIONS = {"--calib": "calibration.spec", "--calib-samples": "calibration.samples", "--calib-seqlen": "calibration.seqlen"}


def _parse_run(text: str, where: str) -> tuple[str, dict[str, object]]:
    """The RUN line: `--passes='<pipeline>'`, then optionally `--calib=SPEC --calib-samples=N --calib-seqlen=N`."""
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise GoldenFormatError(f"{where}: bad RUN line: {exc}") from None
    usage = f"{where}: the RUN line takes --passes='<pipeline>', then optionally {', '.join(o + '=' for o in _CALIB_OPTIONS)}"
    if not words or not words[0].startswith("--passes="):
        raise GoldenFormatError(usage)
    config: dict[str, object] = {}
    for word in words[1:]:
        name, sep, value = word.partition("=")
        if name not in _CALIB_OPTIONS or not sep or not value or _CALIB_OPTIONS[name] in config:
            raise GoldenFormatError(usage)
        if name != "--calib" and not value.isdigit():
            raise GoldenFormatError(f"{where}: {name} takes a whole number, got {value!r}")
        config[_CALIB_OPTIONS[name]] = value if name == "--calib" else int(value)
    return words[0][len("--passes="):], config


def _parse_case(path: Path, start: int, chunk: list[str]) -> Case:
    while chunk and not chunk[0].strip():
        chunk, start = chunk[1:], start + 1
    if not chunk or not chunk[0].startswith(CASE):
        raise GoldenFormatError(f"{path}:{start}: a case must start with `{CASE} <name>`")
    name = chunk[0][len(CASE):].strip()
    if not _CASE_NAME.match(name):
        raise GoldenFormatError(f"{path}:{start}: case name {name!r} must be lowercase words joined by '-'")
    markers = [i for i, line in enumerate(chunk) if line.startswith((EXPECTED, EXPECTED_ERROR))]
    first_check = next((i for i, line in enumerate(chunk) if _is_check_line(line)), None)
    if first_check is not None:
        if markers:
            raise GoldenFormatError(
                f"{path}:{start + markers[0]}: case {name!r} mixes an expected section with CHECK lines; use one"
            )
        return _parse_check_case(path, start, name, chunk, first_check)
    if len(markers) > 1:
        raise GoldenFormatError(f"{path}:{start + markers[1]}: case {name!r} has two expected sections")
    if not markers:
        return Case(name, start, _strip_trailing_blank(chunk), None, None)
    mark = markers[0]
    marker_line = chunk[mark]
    body = _strip_trailing_blank(chunk[mark + 1:])
    if marker_line.startswith(EXPECTED_ERROR):
        if body:
            raise GoldenFormatError(f"{path}:{start + mark + 1}: nothing may follow `{EXPECTED_ERROR}` in a case")
        error = marker_line[len(EXPECTED_ERROR):].strip()
        return Case(name, start, _strip_trailing_blank(chunk[:mark]), None, error)
    if marker_line.strip() != EXPECTED:
        raise GoldenFormatError(f"{path}:{start + mark}: `{EXPECTED}` stands alone on its line")
    expected = "\n".join(body) + "\n" if body else None
    return Case(name, start, _strip_trailing_blank(chunk[:mark]), expected, None)


def _is_check_line(line: str) -> bool:
    return line.rstrip() == UNCHANGED or line.startswith(XFAIL) or looks_like_directive(line, PREFIXES)


def _parse_check_case(path: Path, start: int, name: str, chunk: list[str], first: int) -> Case:
    """A case whose input is followed by directives: only directives, comments and blank lines after the first."""
    checks: list[Directive] = []
    unchanged = False
    xfail: str | None = None
    shown = path.relative_to(GOLDEN_DIR.parent.parent) if path.is_relative_to(GOLDEN_DIR.parent.parent) else path
    for offset, line in enumerate(chunk[first:], start=first):
        where = f"{shown}:{start + offset}"
        if line.startswith(XFAIL):
            xfail = line[len(XFAIL):].strip()
            if not xfail:
                raise GoldenFormatError(f"{where}: `{XFAIL}` names the bug the case documents")
        elif line.rstrip() == UNCHANGED:
            if unchanged:
                raise GoldenFormatError(f"{where}: `{UNCHANGED}` is written twice in case {name!r}")
            unchanged = True
        elif looks_like_directive(line, PREFIXES):
            try:
                checks.append(parse_directive(line, where, PREFIXES))
            except CheckFormatError as exc:
                raise GoldenFormatError(str(exc)) from None
        elif line.strip() and not line.startswith("#"):
            raise GoldenFormatError(
                f"{where}: only CHECK lines and comments may follow the first CHECK line of case {name!r}"
                " (the input comes first)"
            )
    return Case(
        name, start, _strip_trailing_blank(chunk[:first]), None, None,
        checks=checks, unchanged=unchanged, xfail=xfail, check_lines=_strip_trailing_blank(chunk[first:]),
    )


def _strip_trailing_blank(lines: list[str]) -> list[str]:
    end = len(lines)
    while end and not lines[end - 1].strip():
        end -= 1
    return list(lines[:end])


def run_case(pipeline: str, case: Case, config: dict[str, object] | None = None) -> Outcome:
    """Parse the input, run the pipeline (with the RUN line's calibration `config`) and the verifier after
    every pass, print the result; stderr and log records of the run are captured with the statistics."""
    model = parse_text(case.input_text)
    input_printed = print_ir(model)
    statistics = StatisticsInstrument()
    am = AnalysisManager(PassContext(config=dict(config or {}), instruments=[VerifyEach(), statistics]))
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stderr(captured):
            result = parse_pipeline(pipeline)(model, am)
            verify(result.model, where="after the pipeline")
    except OptcError as exc:
        return Outcome(None, str(exc).strip().splitlines()[0], False, input_printed, _stderr(captured, statistics, am))
    finally:
        root.removeHandler(handler)
    return Outcome(print_ir(result.model), None, result.modified, input_printed, _stderr(captured, statistics, am))


def _stderr(captured: io.StringIO, statistics: StatisticsInstrument, am: AnalysisManager) -> str:
    # Progress bars redraw with carriage returns: keep only what each line finally showed.
    lines = [line.rsplit("\r", 1)[-1] for line in captured.getvalue().splitlines()]
    # Every remark of the run, as `remark: <kind>: <pass>: <message>` (what --remarks prints, with its kind).
    lines += [f"remark: {r.kind}: {r}" for r in am.context.remarks]
    text = "\n".join(line for line in lines if line.strip())
    return (text + "\n" if text else "") + statistics.report() + "\n"


def render(golden: GoldenFile, outcomes: dict[str, Outcome]) -> str:
    """The file text with each case's expected section replaced by its outcome (others, and every CHECK
    section, kept as written)."""
    out = list(golden.header)
    for case in golden.cases:
        out.append(SEPARATOR)
        out.extend(case.input_lines)
        outcome = None if case.is_check_case else outcomes.get(case.name)
        if case.is_check_case:
            out.extend(case.check_lines)
        elif outcome is not None and outcome.error is not None:
            out.append(f"{EXPECTED_ERROR} {outcome.error}".rstrip())
        elif outcome is not None:
            out.append(EXPECTED)
            out.extend(outcome.text.rstrip("\n").splitlines())
        elif case.expected_error is not None:
            out.append(f"{EXPECTED_ERROR} {case.expected_error}".rstrip())
        elif case.expected is not None:
            out.append(EXPECTED)
            out.extend(case.expected.rstrip("\n").splitlines())
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"
