"""PassManager: checks around passes, failure reports, fixpoints, disabled passes, nesting."""

from __future__ import annotations

import dataclasses

import pytest

import optc.ir as oi
from optc.errors import OptcError, PassFailure, PostconditionError, PreconditionError
from optc.passes import (
    Fixpoint,
    Pass,
    PassContext,
    PassInstrument,
    PassManager,
    PassResult,
    PreservedAnalyses,
    option,
    parse_pipeline,
    register_pass,
)
from optc.passes.infra.analysis import AnalysisManager
from tests.fixtures import models

# --- test passes ----------------------------------------------------------------------------


class Record(Pass):
    """Appends its label to a shared log; changes nothing."""

    name = "t-record"

    @dataclasses.dataclass
    class Options:
        label: str = option("r")

    log: list[str] = []

    def run(self, model, am):
        Record.log.append(self.options.label)
        return PassResult(model, modified=False)


class Fail(Pass):
    name = "t-fail"

    def __init__(self, error: BaseException | None = None):
        super().__init__()
        self.error = error if error is not None else ValueError("boom")

    def run(self, model, am):
        raise self.error


class RemoveOneRelu(Pass):
    """Replaces the first Relu by its input; reports a change only when it made one."""

    name = "t-remove-relu"

    def run(self, model, am):
        for node in model.graph:
            if node.op_type == "Relu":
                node.outputs[0].replace_all_uses_with(node.inputs[0], replace_graph_outputs=True)
                model.graph.remove(node, safe=True)
                return PassResult(model, modified=True, statistics={"removed": 1})
        return PassResult(model, modified=False)


class AddRelu(Pass):
    """Appends a Relu after the graph output (k times in total, counted on the class)."""

    name = "t-add-relu"
    budget = 0

    def run(self, model, am):
        if AddRelu.budget <= 0:
            return PassResult(model, modified=False)
        AddRelu.budget -= 1
        out = model.graph.outputs[0]
        relu = oi.make_node("Relu", [out])
        model.graph.append(relu)
        relu.outputs[0].name = oi.unique_name(model.graph, "relu_out")
        model.graph.outputs[0] = relu.outputs[0]
        return PassResult(model, modified=True, statistics={"added": 1})


@pytest.fixture(autouse=True)
def _reset():
    Record.log = []
    AddRelu.budget = 0


def _relu_count(model) -> int:
    return sum(n.op_type == "Relu" for n in model.graph)


# --- requires / ensures ---------------------------------------------------------------------


class NeedsRelu(Pass):
    name = "t-needs-relu"

    def requires(self, model, am):
        if not any(n.op_type == "Relu" for n in model.graph):
            raise PreconditionError("pass 't-needs-relu': no Relu in the graph")

    def run(self, model, am):
        return PassResult(model, modified=False)


class PromisesNoRelu(Pass):
    name = "t-promises-no-relu"

    def ensures(self, model, am):
        assert not any(n.op_type == "Relu" for n in model.graph), "a Relu survived"

    def run(self, model, am):
        return PassResult(model, modified=False)


class RequiresRaisesPlainError(Pass):
    name = "t-requires-plain"

    def requires(self, model, am):
        raise KeyError("shape of X")

    def run(self, model, am):  # pragma: no cover - never reached
        raise AssertionError("run after failed requires")


def test_requires_raises_precondition_error(mlp):
    NeedsRelu()(mlp)  # holds
    RemoveOneRelu()(mlp)
    with pytest.raises(PreconditionError, match="no Relu"):
        NeedsRelu()(mlp)


def test_requires_other_exceptions_become_precondition_errors(mlp):
    with pytest.raises(PreconditionError, match="pass 't-requires-plain': precondition failed: 'shape of X'"):
        RequiresRaisesPlainError()(mlp)


def test_ensures_raises_postcondition_error(mlp):
    with pytest.raises(PostconditionError, match="pass 't-promises-no-relu': postcondition failed: a Relu survived"):
        PromisesNoRelu()(mlp)
    RemoveOneRelu()(mlp)
    PromisesNoRelu()(mlp)


def test_checks_inside_a_pass_manager_wrap_into_pass_failure(mlp):
    RemoveOneRelu()(mlp)
    with pytest.raises(PassFailure) as info:
        PassManager([Record(), NeedsRelu()])(mlp)
    assert isinstance(info.value.cause, PreconditionError)
    assert info.value.pass_name == "t-needs-relu"
    with pytest.raises(PassFailure) as info:
        PassManager([AddRelu(), PromisesNoRelu()])(models.to_ir(models.mlp()))
    assert isinstance(info.value.cause, PostconditionError)


def test_run_must_return_pass_result(mlp):
    class Bad(Pass):
        name = "t-bad-result"

        def run(self, model, am):
            return model

    with pytest.raises(TypeError, match="pass 't-bad-result' returned Model, not PassResult"):
        Bad()(mlp)


def test_pass_without_run(mlp):
    class Empty(Pass):
        name = "t-empty"

    with pytest.raises(NotImplementedError, match="t-empty"):
        Empty()(mlp)


# --- failures -------------------------------------------------------------------------------


def test_failure_names_the_pass_and_the_passes_before_it(mlp):
    pm = PassManager([Record(label="a"), Record(label="b c"), Fail(), Record(label="never")])
    with pytest.raises(PassFailure) as info:
        pm(mlp)
    failure = info.value
    assert failure.pass_name == "t-fail"
    assert failure.before == ["t-record{label=a}", 't-record{label="b c"}']
    assert str(failure) == "pass 't-fail' failed (after t-record{label=a}, t-record{label=\"b c\"}): boom"
    assert isinstance(failure.cause, ValueError)
    assert isinstance(failure.__cause__, ValueError)
    assert Record.log == ["a", "b c"]
    assert isinstance(failure, OptcError) and failure.exit_code == 1


def test_first_pass_failure_has_no_before(mlp):
    with pytest.raises(PassFailure) as info:
        PassManager([Fail()])(mlp)
    assert info.value.before == []
    assert str(info.value) == "pass 't-fail' failed: boom"


def test_failure_without_message_names_the_exception_type(mlp):
    with pytest.raises(PassFailure, match="pass 't-fail' failed: ZeroDivisionError"):
        PassManager([Fail(ZeroDivisionError())])(mlp)


def test_nested_failure_names_outer_and_inner_passes(mlp):
    pm = PassManager([Record(label="a"), Fixpoint([Record(label="b"), Fail()])])
    with pytest.raises(PassFailure) as info:
        pm(mlp)
    assert info.value.pass_name == "t-fail"
    assert info.value.before == ["t-record{label=a}", "t-record{label=b}"]
    assert isinstance(info.value.cause, ValueError)


def test_keyboard_interrupt_is_not_wrapped(mlp):
    with pytest.raises(KeyboardInterrupt):
        PassManager([Fail(KeyboardInterrupt())])(mlp)


# --- fixpoint -------------------------------------------------------------------------------


def test_fixpoint_stops_when_nothing_changes():
    model = models.to_ir(models.mlp())
    AddRelu.budget = 3
    result = Fixpoint([AddRelu(), Record()])(model)
    assert result.modified
    assert result.statistics == {"rounds": 4, "added": 3}
    assert Record.log == ["r"] * 4
    assert _relu_count(result.model) == 4
    oi.verify(result.model)


def test_fixpoint_unchanged_preserves_all(mlp):
    result = Fixpoint([Record()])(mlp)
    assert not result.modified
    assert result.statistics == {"rounds": 1}
    assert result.effective_preserved().all_preserved()


def test_fixpoint_max_iterations_bounds_rounds():
    model = models.to_ir(models.mlp())
    AddRelu.budget = 100
    result = Fixpoint([AddRelu()], max_iterations=3)(model)
    assert result.statistics["rounds"] == 3
    assert AddRelu.budget == 97


def test_fixpoint_from_pipeline_text(scratch_registry):
    register_pass("t-add-relu")(AddRelu)
    register_pass("t-remove-relu")(RemoveOneRelu)
    model = models.to_ir(models.mlp())
    AddRelu.budget = 2
    result = parse_pipeline("fixpoint{max-iterations=5}(t-add-relu),fixpoint(t-remove-relu)")(model)
    assert _relu_count(result.model) == 0
    assert result.statistics == {"rounds": 3 + 4, "added": 2, "removed": 3}


# --- disabled and required ------------------------------------------------------------------


def test_disabled_passes_are_skipped_unless_required(mlp):
    class Essential(Record):
        name = "t-essential"
        required = True

        def run(self, model, am):
            Record.log.append("essential")
            return PassResult(model, modified=False)

    context = PassContext(disabled=frozenset({"t-record", "t-essential"}))
    am = AnalysisManager(context)
    PassManager([Record(label="a"), Essential(), Fixpoint([Record(label="b")])])(mlp, am)
    assert Record.log == ["essential"]

    PassManager([Record(label="a"), Essential()])(mlp, AnalysisManager())
    assert Record.log == ["essential", "a", "essential"]


def test_disabling_a_container_skips_its_children(mlp):
    am = AnalysisManager(PassContext(disabled=frozenset({"fixpoint"})))
    PassManager([Fixpoint([Record(label="inside")]), Record(label="outside")])(mlp, am)
    assert Record.log == ["outside"]


def test_should_run_instrument_can_skip(mlp):
    class SkipB(PassInstrument):
        def should_run(self, pass_, model):
            return getattr(pass_.options, "label", None) != "b"

    am = AnalysisManager(PassContext(instruments=[SkipB()]))
    PassManager([Record(label="a"), Record(label="b"), Record(label="c")])(mlp, am)
    assert Record.log == ["a", "c"]


# --- results --------------------------------------------------------------------------------


def test_result_combines_statistics_and_modified():
    model = models.to_ir(models.mlp())
    AddRelu.budget = 2
    result = PassManager([AddRelu(), AddRelu(), AddRelu(), RemoveOneRelu()])(model)
    assert result.modified
    assert result.statistics == {"added": 2, "removed": 1}
    assert _relu_count(result.model) == 2


def test_pass_may_return_a_new_model(mlp):
    class Rebuild(Pass):
        name = "t-rebuild"

        def run(self, model, am):
            return PassResult(models.to_ir(models.dead_nodes()), modified=True)

    class Count(Pass):
        name = "t-count"
        seen: list[int] = []

        def run(self, model, am):
            Count.seen.append(model.graph.num_nodes())
            return PassResult(model, modified=False)

    result = PassManager([Count(), Rebuild(), Count()])(mlp)
    assert Count.seen == [5, 7]
    assert result.model is not mlp


def test_empty_pass_manager(mlp):
    result = PassManager()(mlp)
    assert result.model is mlp and not result.modified
    assert PassManager().pipeline_text() == ""


def test_add_and_equality():
    pm = PassManager().add(Record(label="a")).add(Fixpoint([Record()]))
    assert pm.pipeline_text() == "t-record{label=a},fixpoint(t-record)"
    assert pm == PassManager([Record(label="a"), Fixpoint([Record()])])
    assert pm != PassManager([Record(label="a")])
    assert Fixpoint([Record()]) != Fixpoint([Record()], max_iterations=2)
    assert hash(pm) == hash(PassManager([Record(label="a"), Fixpoint([Record()])]))


def test_pass_manager_preserved_when_unchanged(mlp):
    result = PassManager([Record(), Record()])(mlp)
    assert result.effective_preserved().all_preserved()


def test_nested_pass_manager_preserved_is_intersection(mlp):
    from optc.passes import STRUCTURE, WEIGHTS

    class Keep(Pass):
        name = "t-keep"

        def __init__(self, *aspects):
            super().__init__()
            self.aspects = aspects

        def run(self, model, am):
            return PassResult(model, modified=True, preserved=PreservedAnalyses().preserve_aspects(*self.aspects))

    result = PassManager([Keep(STRUCTURE, WEIGHTS), Keep(WEIGHTS)])(mlp)
    assert result.preserved is not None
    assert repr(result.preserved) == "PreservedAnalyses(weights)"
