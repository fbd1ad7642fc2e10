"""Fuzzing the pipeline parser over the real registry (built-in passes, their real options).

* parse -> print -> parse is the identity on generated valid pipelines;
* ANY text is either parsed (and then prints to text that parses back to the
  same pipeline) or refused with a `UsageError`: never another exception, and
  on the command line exit code 2 with one line.

The example budget is fixed and derandomized, so CI runs the same examples every time.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from optc.errors import UsageError
from optc.passes import (
    PassManager,
    all_analyses,
    all_passes,
    all_pipelines,
    parse_pipeline,
    print_pipeline,
)
from optc.passes.infra.options import format_value, to_kebab
from optc.passes.infra.pipeline import MAX_NESTING
from tests.cli.cli_support import Job, run_in_process

_SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

_text_items = st.text(min_size=1, max_size=6).filter(lambda s: "," not in s and s == s.strip())


def _values(tp: Any) -> st.SearchStrategy:
    """Values of an option type (not always valid for the pass: `validate` may refuse them)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return st.sampled_from(list(typing.get_args(tp)))
    if origin is list:
        item = typing.get_args(tp)[0]
        items = _text_items if item is str else _values(item)
        return st.lists(items, max_size=3)
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.one_of(st.none(), _values(inner[0]))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**40), 2**40) | st.integers(0, 300)
    if tp is float:
        return st.floats(allow_nan=False, width=64) | st.floats(0.0, 1.0)
    return st.text(max_size=8)


def _pass_names() -> list[str]:
    return sorted(name for name, cls in all_passes().items() if not getattr(cls, "container", False))


@st.composite
def _option_text(draw, name: str) -> str:
    """`name{k=v ...}` with a few of the pass's options changed."""
    cls = all_passes()[name]
    fields = dataclasses.fields(cls.Options)
    if not fields:
        return name
    hints = typing.get_type_hints(cls.Options)
    chosen = draw(st.lists(st.sampled_from(fields), max_size=2, unique_by=lambda f: f.name))
    items = [f"{to_kebab(f.name)}={format_value(draw(_values(hints[f.name])))}" for f in chosen]
    return name + ("{" + " ".join(items) + "}" if items else "")


@st.composite
def _pipeline_text(draw, depth: int = 0) -> str:
    """Text of a pipeline of real passes, named pipelines, analyses pseudo-passes and nested fixpoints."""
    elements = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["pass", "pass", "pass", "named", "analysis", "fixpoint"]))
        if kind == "pass":
            elements.append(draw(_option_text(draw(st.sampled_from(_pass_names())))))
        elif kind == "named":
            elements.append(draw(st.sampled_from(sorted(all_pipelines()))))
        elif kind == "analysis":
            verb = draw(st.sampled_from(["require", "invalidate"]))
            names = sorted(all_analyses()) + (["all"] if verb == "invalidate" else [])
            elements.append(f"{verb}<{draw(st.sampled_from(names))}>")
        elif depth < 3:
            rounds = draw(st.integers(1, 20))
            elements.append(f"fixpoint{{max-iterations={rounds}}}({draw(_pipeline_text(depth + 1))})")
    return ",".join(elements)


def _parse_or_none(text: str) -> PassManager | None:
    try:
        return parse_pipeline(text)
    except UsageError:
        return None


@_SETTINGS
@given(_pipeline_text())
def test_parse_print_parse_is_the_identity(text: str) -> None:
    pipeline = _parse_or_none(text)
    assume(pipeline is not None)  # an option value the pass's own validation refuses
    printed = print_pipeline(pipeline)
    again = parse_pipeline(printed)
    assert again == pipeline
    assert print_pipeline(again) == printed


#: Text made of the grammar's own pieces, so that the fuzzer reaches deep into the parser.
_pieces = st.sampled_from([
    "dce", "cse", "fixpoint", "cleanup", "quantize", "rtn", "kquant", "require", "invalidate", "all",
    "graph-stats", "activation-stats", "{", "}", "(", ")", "<", ">", ",", "=", " ", "\t", '"', "'", "\\",
    "constant-bytes", "max-iterations", "bits", "exclude", "1", "-1", "0x1f", "1e999", "nan", "true",
    "pässé", "é", "\x00", "\x1b", "\u2028", "名前",
])
_grammar_text = st.lists(_pieces, max_size=24).map("".join)


def _check_any_text(text: str) -> None:
    try:
        pipeline = parse_pipeline(text)
    except UsageError as exc:
        message = str(exc)
        assert message and "\n" not in message.strip()
        return
    printed = print_pipeline(pipeline)
    assert parse_pipeline(printed) == pipeline
    assert print_pipeline(parse_pipeline(printed)) == printed


@_SETTINGS
@given(_grammar_text)
def test_grammar_pieces_parse_or_are_refused_as_usage_errors(text: str) -> None:
    _check_any_text(text)


@_SETTINGS
@given(st.text(max_size=40))
def test_any_text_parses_or_is_refused_as_a_usage_error(text: str) -> None:
    _check_any_text(text)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])
@given(text=_grammar_text | st.text(max_size=30))
def test_the_command_line_prints_or_exits_2_with_one_line(tmp_path, text: str) -> None:
    run = run_in_process(Job(["--print-pipeline", "--passes", text], tmp_path))
    assert "Traceback" not in run.stderr, run
    if run.returncode == 0:
        assert run.stderr == "" and parse_pipeline(run.stdout.rstrip("\n")) == parse_pipeline(text), run
    else:
        assert run.returncode == 2 and len(run.stderr_lines) == 1 and run.stdout == "", run
        assert run.stderr.startswith("optc: error: "), run


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("fixpoint(" * 2000 + "dce" + ")" * 2000, [f"more than {MAX_NESTING} levels"]),
        ("fixpoint(" * 2000, [f"more than {MAX_NESTING} levels"]),
        ("pässé", ["unknown pass 'pässé'"]),
        ("dce,名前{x=1}", ["unknown pass '名前'"]),
        ("cse{kéy=1}", ["'kéy'"]),
        ("require<grâph>", ["unknown analysis 'grâph'"]),
    ],
)
def test_hostile_pipelines_are_usage_errors_on_the_command_line(tmp_path, text: str, mentions: list[str]) -> None:
    run = run_in_process(Job(["--print-pipeline", "--passes", text], tmp_path))
    assert run.returncode == 2, run
    assert len(run.stderr_lines) == 1 and run.stderr.startswith("optc: error: "), run
    assert "Traceback" not in run.stderr and run.stdout == ""
    for text_ in mentions:
        assert text_ in run.stderr, run


def test_nesting_up_to_the_limit_parses() -> None:
    text = "fixpoint(" * MAX_NESTING + "dce" + ")" * MAX_NESTING
    assert print_pipeline(parse_pipeline(text)) == text
