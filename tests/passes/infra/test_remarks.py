"""Remarks: a pass says what it could not handle; `strict` makes a `missed` remark an error."""

from __future__ import annotations

import io

import pytest

from optc.passes import (
    AnalysisManager,
    Fixpoint,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Remark,
    RemarkError,
    RemarkPrinter,
)
from optc.passes.infra.remarks import compile_filter, match_summary, unique_remarks
from tests.fixtures import models


class Misses(Pass):
    """Finds two blocks it targets and handles neither."""

    name = "t-misses"

    def run(self, model, am):
        am.context.remark("missed", "0 of 2 blocks matched: fused", matched_none=True)
        return PassResult(model, False)


class Partial(Pass):
    """Handles one of two blocks, and says what it did."""

    name = "t-partial"

    def run(self, model, am):
        am.context.remark("missed", "1 of 2 blocks matched: odd width")
        am.context.remark("passed", "rewrote 1 block")
        am.context.remark("analysis", "block 0 dominates")
        return PassResult(model, False)


class Quiet(Pass):
    name = "t-quiet"

    def run(self, model, am):
        return PassResult(model, False)


class BadKind(Pass):
    name = "t-bad-kind"

    def run(self, model, am):
        am.context.remark("oops", "x")
        return PassResult(model, False)


def _run(passes, *, strict=False, pattern=None):
    stream = io.StringIO()
    context = PassContext(instruments=[RemarkPrinter(compile_filter(pattern) if pattern else None, stream)],
                          strict=strict)
    result = PassManager(passes)(models.to_ir(models.mlp()), AnalysisManager(context))
    return result, context, stream.getvalue()


def test_remarks_are_collected_on_the_context_and_the_results():
    result, context, printed = _run([Misses(), Quiet(), Partial()])
    assert [(r.pass_name, r.kind) for r in context.remarks] == [
        ("t-misses", "missed"), ("t-partial", "missed"), ("t-partial", "passed"), ("t-partial", "analysis"),
    ]
    assert result.remarks == context.remarks
    assert context.remarks[0] == Remark("t-misses", "missed", "0 of 2 blocks matched: fused", matched_none=True)
    # Without a filter only the pass that matched nothing it was meant for is printed.
    assert printed == "optc: remark: t-misses: 0 of 2 blocks matched: fused\n"


def test_a_standalone_pass_returns_its_remarks():
    result = Partial()(models.to_ir(models.mlp()))
    assert [r.kind for r in result.remarks] == ["missed", "passed", "analysis"]
    assert Quiet()(models.to_ir(models.mlp())).remarks == []


def test_the_filter_prints_every_remark_of_the_passes_it_names():
    _, _, printed = _run([Misses(), Partial()], pattern="partial")
    assert printed.splitlines() == [
        "optc: remark: t-misses: 0 of 2 blocks matched: fused",
        "optc: remark: t-partial: 1 of 2 blocks matched: odd width",
        "optc: remark: t-partial: rewrote 1 block",
        "optc: remark: t-partial: block 0 dominates",
    ]


def test_a_fixpoint_prints_a_repeated_remark_once():
    _, context, printed = _run([Fixpoint([Misses()], max_iterations=3)], pattern=".*")
    assert printed == "optc: remark: t-misses: 0 of 2 blocks matched: fused\n"
    assert len(unique_remarks(context.remarks)) == 1


def test_strict_fails_the_pass_that_missed_and_stops_the_pipeline():
    ran = []

    class After(Pass):
        name = "t-after"

        def run(self, model, am):
            ran.append(self.name)
            return PassResult(model, False)

    with pytest.raises(RemarkError) as info:
        _run([Quiet(), Partial(), After()], strict=True)
    assert str(info.value) == "--strict: t-partial: 1 of 2 blocks matched: odd width"
    assert info.value.exit_code == 1
    assert ran == []


def test_strict_accepts_passed_and_analysis_remarks():
    class Reports(Pass):
        name = "t-reports"

        def run(self, model, am):
            am.context.remark("passed", "did it")
            am.context.remark("analysis", "because")
            return PassResult(model, False)

    result, _, _ = _run([Reports()], strict=True)
    assert [r.kind for r in result.remarks] == ["passed", "analysis"]


def test_a_remark_must_have_a_known_kind_and_one_line():
    with pytest.raises(Exception, match="remark kind must be one of passed, missed, analysis"):
        _run([BadKind()])
    with pytest.raises(ValueError, match="one non-empty line"):
        PassContext().remark("missed", "two\nlines")


def test_a_bad_filter_is_named():
    with pytest.raises(ValueError, match=r"--remarks: invalid regular expression '\('"):
        compile_filter("(")


def test_match_summary():
    assert match_summary(0, ["fused qkv_proj"] * 2, "attention blocks") == "0 of 2 attention blocks matched: fused qkv_proj"
    assert match_summary(1, ["a", "b", "a"], "MLP blocks") == "1 of 4 MLP blocks matched: a (2), b (1)"
