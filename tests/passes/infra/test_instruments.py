"""Pass instruments: stack order, verify-each, print-IR-after-change, statistics, timing."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest

import optc.ir as oi
from optc.errors import PassFailure, VerificationError
from optc.passes import (
    Analysis,
    AnalysisManager,
    Fixpoint,
    Pass,
    PassContext,
    PassInstrument,
    PassManager,
    PassResult,
    PrintIRAfterChange,
    StatisticsInstrument,
    TimingInstrument,
    VerifyEach,
)
from optc.passes.infra.instruments import fingerprint
from tests.fixtures import models

# --- test passes ----------------------------------------------------------------------------


class Nothing(Pass):
    name = "t-nothing"

    def run(self, model, am):
        return PassResult(model, modified=False)


class ClaimsChange(Pass):
    """Says it changed the IR but did not."""

    name = "t-claims-change"

    def run(self, model, am):
        return PassResult(model, modified=True)


class RenameNode(Pass):
    name = "t-rename"

    def run(self, model, am):
        node = next(iter(model.graph))
        node.name = node.name + "_x"
        return PassResult(model, modified=True, statistics={"renamed": 1, "ratio": 0.5})


class ScaleWeight(Pass):
    """Replaces W1 by a new tensor (weights change, structure does not)."""

    name = "t-scale-weight"

    def run(self, model, am):
        value = model.graph.initializers["W1"]
        value.const_value = oi.tensor(value.const_value.numpy() * np.float32(2), name="W1")
        return PassResult(model, modified=True)


class BreakGraph(Pass):
    """Moves the first node to the end, so its consumers use a value before it is defined."""

    name = "t-break-graph"

    def run(self, model, am):
        first = next(iter(model.graph))
        model.graph.remove(first)
        model.graph.append(first)
        return PassResult(model, modified=True)


class DropRelu(Pass):
    name = "t-drop-relu"

    def run(self, model, am):
        for node in list(model.graph):
            if node.op_type == "Relu":
                node.outputs[0].replace_all_uses_with(node.inputs[0])
                model.graph.remove(node, safe=True)
                return PassResult(model, modified=True, statistics={"nodes-removed": 1})
        return PassResult(model, modified=False)


class Boom(Pass):
    name = "t-boom"

    def run(self, model, am):
        raise RuntimeError("boom")


class Slow(Pass):
    name = "t-slow"

    def run(self, model, am):
        am.get(SlowAnalysis, model)
        time.sleep(0.02)
        return PassResult(model, modified=False)


class SlowAnalysis(Analysis):
    name = "t-slow-analysis"

    def run(self, model, am):
        time.sleep(0.01)
        return 1


def _run(passes, instruments, model=None):
    model = model if model is not None else models.to_ir(models.mlp())
    am = AnalysisManager(PassContext(instruments=list(instruments)))
    return PassManager(passes)(model, am)


# --- stack order ----------------------------------------------------------------------------


class Recorder(PassInstrument):
    def __init__(self, tag: str, log: list):
        self.tag = tag
        self.log = log

    def should_run(self, pass_, model):
        self.log.append((self.tag, "should_run", pass_.name))
        return True

    def before_pass(self, pass_, model):
        self.log.append((self.tag, "before", pass_.name))

    def after_pass(self, pass_, model, result, elapsed):
        assert elapsed >= 0
        self.log.append((self.tag, "after", pass_.name))

    def after_pass_failed(self, pass_, model, error):
        self.log.append((self.tag, "failed", pass_.name))

    def before_analysis(self, analysis, model):
        self.log.append((self.tag, "before_analysis", analysis.name))

    def after_analysis(self, analysis, model, elapsed):
        self.log.append((self.tag, "after_analysis", analysis.name))


def test_instruments_called_in_stack_order():
    log: list = []
    _run([Nothing(), Slow()], [Recorder("A", log), Recorder("B", log)])
    assert log == [
        ("A", "should_run", "t-nothing"), ("B", "should_run", "t-nothing"),
        ("A", "before", "t-nothing"), ("B", "before", "t-nothing"),
        ("B", "after", "t-nothing"), ("A", "after", "t-nothing"),
        ("A", "should_run", "t-slow"), ("B", "should_run", "t-slow"),
        ("A", "before", "t-slow"), ("B", "before", "t-slow"),
        ("A", "before_analysis", "t-slow-analysis"), ("B", "before_analysis", "t-slow-analysis"),
        ("B", "after_analysis", "t-slow-analysis"), ("A", "after_analysis", "t-slow-analysis"),
        ("B", "after", "t-slow"), ("A", "after", "t-slow"),
    ]


def test_failure_hooks_in_stack_order():
    log: list = []
    with pytest.raises(PassFailure):
        _run([Boom()], [Recorder("A", log), Recorder("B", log)])
    assert [entry for entry in log if entry[1] != "should_run"] == [
        ("A", "before", "t-boom"), ("B", "before", "t-boom"),
        ("B", "failed", "t-boom"), ("A", "failed", "t-boom"),
    ]


def test_nested_passes_are_bracketed_by_their_container():
    log: list = []
    _run([Fixpoint([Nothing()])], [Recorder("A", log)])
    assert [(what, name) for _, what, name in log if what != "should_run"] == [
        ("before", "fixpoint"), ("before", "t-nothing"), ("after", "t-nothing"), ("after", "fixpoint"),
    ]


# --- verify-each ----------------------------------------------------------------------------


def test_verify_each_names_the_pass_that_broke_the_ir():
    # Wrapped as a PassFailure naming the pass, so the driver writes a reproducer.
    with pytest.raises(PassFailure) as info:
        _run([Nothing(), RenameNode(), BreakGraph(), Nothing()], [VerifyEach()])
    message = str(info.value)
    assert info.value.pass_name == "t-break-graph"
    assert "after pass 't-break-graph'" in message
    assert "not in topological order" in message
    assert isinstance(info.value.cause, VerificationError)
    assert info.value.cause.problems


def test_verify_each_inside_a_container():
    # The container reports the failure of its child, whose name is in the message.
    with pytest.raises(PassFailure) as info:
        _run([Fixpoint([Nothing(), BreakGraph()], max_iterations=1)], [VerifyEach()])
    assert isinstance(info.value.cause, VerificationError)
    assert "after pass 't-break-graph'" in str(info.value)


def test_verify_each_quiet_on_valid_passes():
    result = _run([Nothing(), RenameNode(), DropRelu(), ScaleWeight()], [VerifyEach()])
    oi.verify(result.model)


def test_without_verify_each_the_broken_ir_goes_through():
    result = _run([BreakGraph()], [])
    assert oi.problems(result.model)


# --- print-IR-after-change ------------------------------------------------------------------


def test_print_ir_after_change_prints_only_changing_passes():
    stream = io.StringIO()
    _run([Nothing(), ClaimsChange(), RenameNode(), Nothing(), DropRelu(), DropRelu()],
         [PrintIRAfterChange(stream)])
    text = stream.getvalue()
    headers = [line for line in text.splitlines() if line.startswith("// -----// IR Dump After")]
    assert headers == [
        "// -----// IR Dump After t-rename //----- //",
        "// -----// IR Dump After t-drop-relu //----- //",
    ]
    # Each dump is the IR after that pass, with big weights elided.
    first, second = text.split("// -----// IR Dump After t-drop-relu //----- //")
    assert "[mm1_x] h0 = MatMul" in first and "Relu" in first
    assert "Relu" not in second
    assert "float[8,16] W1" in text and "W1 =" not in text


def test_print_ir_after_change_sees_weight_replacement():
    stream = io.StringIO()
    _run([ScaleWeight()], [PrintIRAfterChange(stream, max_elements=10_000)])
    assert "IR Dump After t-scale-weight" in stream.getvalue()
    assert "W1 =" in stream.getvalue()


def test_print_ir_after_change_skips_containers_but_not_their_children():
    stream = io.StringIO()
    _run([Fixpoint([RenameNode()], max_iterations=2)], [PrintIRAfterChange(stream)])
    headers = [line for line in stream.getvalue().splitlines() if line.startswith("// -----//")]
    assert headers == ["// -----// IR Dump After t-rename //----- //"] * 2


def test_print_ir_after_change_survives_a_failure():
    stream = io.StringIO()
    instrument = PrintIRAfterChange(stream)
    with pytest.raises(PassFailure):
        _run([RenameNode(), Boom()], [instrument])
    _run([RenameNode()], [instrument])  # its bookkeeping stack is balanced again
    assert stream.getvalue().count("IR Dump After t-rename") == 2


def test_fingerprint_tracks_structure_and_weight_objects(mlp):
    before = fingerprint(mlp)
    assert fingerprint(mlp) == before
    ScaleWeight()(mlp)
    after_weight = fingerprint(mlp)
    assert after_weight != before
    RenameNode()(mlp)
    assert fingerprint(mlp) != after_weight


# --- statistics -----------------------------------------------------------------------------


def test_statistics_counters():
    stats = StatisticsInstrument()
    _run([Nothing(), RenameNode(), Fixpoint([DropRelu()])], [stats])
    assert stats.rows == [
        {"pass": "t-nothing", "modified": False, "nodes-before": 5, "nodes-after": 5},
        {"pass": "t-rename", "modified": True, "nodes-before": 5, "nodes-after": 5, "renamed": 1, "ratio": 0.5},
        {"pass": "t-drop-relu", "modified": True, "nodes-before": 5, "nodes-after": 4, "nodes-removed": 1},
        {"pass": "t-drop-relu", "modified": False, "nodes-before": 4, "nodes-after": 4},
    ]
    report = stats.report()
    assert report.splitlines() == [
        "===-- optc pass statistics --===",
        "t-nothing: nodes 5 -> 5",
        "t-rename: nodes 5 -> 5, renamed=1, ratio=0.5",
        "t-drop-relu: nodes 5 -> 4, nodes-removed=1",
        "t-drop-relu: nodes 4 -> 4",
    ]


def test_statistics_after_failure_keeps_working():
    stats = StatisticsInstrument()
    with pytest.raises(PassFailure):
        _run([Nothing(), Boom()], [stats])
    assert [row["pass"] for row in stats.rows] == ["t-nothing"]
    _run([DropRelu()], [stats])
    assert stats.rows[-1]["nodes-before"] == 5


# --- timing ---------------------------------------------------------------------------------


def test_timing_report():
    timing = TimingInstrument()
    _run([Nothing(), Slow(), Fixpoint([Nothing()])], [timing])
    kinds = [(kind, name) for kind, name, _ in timing.rows]
    assert kinds == [
        ("pass", "t-nothing"), ("analysis", "t-slow-analysis"), ("pass", "t-slow"), ("pass", "t-nothing"),
    ]
    seconds = {name: s for kind, name, s in timing.rows if kind != "pass" or name == "t-slow"}
    assert seconds["t-slow"] >= 0.02 and seconds["t-slow-analysis"] >= 0.01
    report = timing.report().splitlines()
    assert report[0] == "===-- optc timing report --==="
    assert report[1].split() == ["seconds", "share", "name"]
    assert any(line.endswith("  t-slow") for line in report)
    assert any(line.endswith("[analysis] t-slow-analysis") for line in report)
    assert report[-1].endswith("100.0%  total")
    assert [row["name"] for row in timing.as_dict()] == [name for _, name in kinds]
    assert all(set(row) == {"kind", "name", "seconds"} for row in timing.as_dict())


def test_timing_report_empty():
    assert TimingInstrument().report().splitlines()[-1].split() == ["0.0000", "100.0%", "total"]



def test_timing_counts_an_analysis_inside_a_pass_once():
    """t-slow computes t-slow-analysis (10 ms) and sleeps 20 ms: its row is its own 20 ms, the analysis has its
    own row, and the total is the wall time (not 10 ms more)."""
    timing = TimingInstrument()
    start = time.perf_counter()
    _run([Slow(), Fixpoint([Nothing()])], [timing])
    wall = time.perf_counter() - start
    seconds = {name: s for _, name, s in timing.rows}
    assert 0.02 <= seconds["t-slow"] < 0.02 + 0.009  # without the analysis' 10 ms
    assert seconds["t-slow-analysis"] >= 0.01
    assert sum(s for _, _, s in timing.rows) == pytest.approx(timing.total, abs=2e-3)
    assert 0.03 <= timing.total <= wall
    report = timing.report().splitlines()
    assert report[-1].split()[0] == f"{timing.total:.4f}"
    shares = [float(line.split()[1].rstrip("%")) for line in report[2:-1]]
    assert sum(shares) == pytest.approx(100.0, abs=1.0)


def test_timing_survives_a_failing_analysis():
    class Broken(Analysis):
        name = "t-broken-analysis"

        def run(self, model, am):
            raise RuntimeError("no")

    class UsesBroken(Pass):
        name = "t-uses-broken"

        def run(self, model, am):
            with pytest.raises(RuntimeError):
                am.get(Broken, model)
            return PassResult(model, modified=False)

    timing = TimingInstrument()
    _run([UsesBroken(), Slow()], [timing])
    assert [name for _, name, _ in timing.rows] == ["t-uses-broken", "t-slow-analysis", "t-slow"]
    assert sum(s for _, _, s in timing.rows) == pytest.approx(timing.total, abs=2e-3)
