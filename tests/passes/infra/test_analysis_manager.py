"""AnalysisManager caching and invalidation (LLVM new-PM semantics with MLIR's safe default)."""

from __future__ import annotations

import gc

import pytest

from optc.passes import (
    ACTIVATIONS,
    ASPECTS,
    STRUCTURE,
    WEIGHTS,
    Analysis,
    AnalysisCounter,
    AnalysisManager,
    Pass,
    PassContext,
    PassManager,
    PassResult,
    PreservedAnalyses,
    parse_pipeline,
    register_analysis,
    register_pass,
)
from optc.passes.analyses.graph_stats import GraphStatsAnalysis
from tests.fixtures import models

# --- analyses ------------------------------------------------------------------------------


class Everything(Analysis):
    """Depends on every aspect (the default)."""

    name = "t-everything"

    def run(self, model, am):
        return ("everything", model.graph.num_nodes())


class StructureOnly(Analysis):
    name = "t-structure"
    depends_on = frozenset({STRUCTURE})

    def run(self, model, am):
        return [n.op_type for n in model.graph]


class WeightsOnly(Analysis):
    name = "t-weights"
    depends_on = frozenset({WEIGHTS})

    def run(self, model, am):
        return sorted(model.graph.initializers)


class Calibration(Analysis):
    """Stands in for calibration statistics: depends on activations and structure."""

    name = "t-calibration"
    depends_on = frozenset({STRUCTURE, ACTIVATIONS})

    def run(self, model, am):
        return {"samples": self.params.get("samples", 1), "bins": self.params.get("bins")}


class Derived(Analysis):
    """Built on StructureOnly: recorded as its dependent when it calls am.get."""

    name = "t-derived"
    depends_on = frozenset({WEIGHTS})  # on its own it would survive a structure change

    def run(self, model, am):
        return len(am.get(StructureOnly, model))


class DerivedTwice(Analysis):
    name = "t-derived-twice"
    depends_on = frozenset({WEIGHTS})

    def run(self, model, am):
        return am.get(Derived, model) * 2


class SelfLoop(Analysis):
    name = "t-self-loop"

    def run(self, model, am):
        return am.get(SelfLoop, model)


# --- passes --------------------------------------------------------------------------------


class Use(Pass):
    """Asks for an analysis; changes nothing."""

    name = "t-use"

    def __init__(self, analysis: type[Analysis], **params):
        super().__init__()
        self.analysis = analysis
        self.params = params
        self.seen = []

    def run(self, model, am):
        self.seen.append(am.get(self.analysis, model, **self.params))
        return PassResult(model, modified=False)


class Change(Pass):
    """Reports a change and preserves what it is told to."""

    name = "t-change"

    def __init__(self, preserved: PreservedAnalyses | None = None, modified: bool = True):
        super().__init__()
        self.preserved = preserved
        self.modified = modified

    def run(self, model, am):
        return PassResult(model, modified=self.modified, preserved=self.preserved)


def _run(passes, model=None, am=None):
    model = model if model is not None else models.to_ir(models.mlp())
    am = am if am is not None else AnalysisManager()
    result = PassManager(passes)(model, am)
    return result, am


# --- caching -------------------------------------------------------------------------------


def test_get_computes_once_and_caches(mlp):
    am = AnalysisManager()
    assert am.get_cached(Everything, mlp) is None
    first = am.get(Everything, mlp)
    assert am.get(Everything, mlp) is first
    assert am.get_cached(Everything, mlp) is first
    assert am.run_counts == {"t-everything": 1}
    assert am.cached_analyses(mlp) == [Everything]


def test_get_cached_never_computes(mlp):
    am = AnalysisManager()
    assert am.get_cached(Everything, mlp) is None
    assert am.run_counts == {}


def test_computed_once_across_preserving_passes_and_again_after_one_that_does_not():
    uses = [Use(Calibration) for _ in range(5)]
    passes = [
        uses[0],
        Change(PreservedAnalyses.all()),  # modified but preserves everything
        uses[1],
        Change(modified=False),  # unchanged: all preserved
        uses[2],
        Change(PreservedAnalyses().preserve(Calibration)),  # names it
        uses[3],
        Change(),  # modified, no set: nothing preserved
        uses[4],
    ]
    counter = AnalysisCounter()
    _, am = _run(passes, am=AnalysisManager(PassContext(instruments=[counter])))
    assert am.run_counts == {"t-calibration": 2}
    assert counter.counts == {"t-calibration": 2}
    assert uses[0].seen[0] is uses[3].seen[0]
    assert uses[4].seen[0] is not uses[0].seen[0]


def test_modified_false_preserves_all(mlp):
    am = AnalysisManager()
    for analysis in (Everything, StructureOnly, WeightsOnly, Calibration, Derived):
        am.get(analysis, mlp)
    assert PassResult(mlp, modified=False).effective_preserved().all_preserved()
    PassManager([Change(modified=False)])(mlp, am)
    assert len(am.cached_analyses(mlp)) == 5


def test_modified_true_without_set_preserves_none(mlp):
    am = AnalysisManager()
    for analysis in (Everything, StructureOnly, WeightsOnly, Calibration):
        am.get(analysis, mlp)
    pa = PassResult(mlp, modified=True).effective_preserved()
    assert not any(pa.is_preserved(a) for a in (Everything, StructureOnly, WeightsOnly, Calibration))
    PassManager([Change()])(mlp, am)
    assert am.cached_analyses(mlp) == []


def test_explicit_set_wins_over_modified_flag(mlp):
    # An unchanged pass that still hands back a set (invalidate<...>) is obeyed.
    am = AnalysisManager()
    am.get(Everything, mlp)
    PassManager([Change(PreservedAnalyses.none(), modified=False)])(mlp, am)
    assert am.cached_analyses(mlp) == []


@pytest.mark.parametrize(
    ("aspects", "survivors"),
    [
        ((STRUCTURE,), {StructureOnly}),
        ((WEIGHTS,), {WeightsOnly}),
        ((STRUCTURE, ACTIVATIONS), {StructureOnly, Calibration}),
        ((STRUCTURE, WEIGHTS), {StructureOnly, WeightsOnly}),
        (tuple(ASPECTS), {Everything, StructureOnly, WeightsOnly, Calibration}),
        ((), set()),
    ],
)
def test_aspect_based_preservation(mlp, aspects, survivors):
    am = AnalysisManager()
    for analysis in (Everything, StructureOnly, WeightsOnly, Calibration):
        am.get(analysis, mlp)
    PassManager([Change(PreservedAnalyses().preserve_aspects(*aspects))])(mlp, am)
    assert set(am.cached_analyses(mlp)) == survivors


def test_named_preservation_beats_missing_aspects(mlp):
    pa = PreservedAnalyses().preserve_aspects(WEIGHTS).preserve(Calibration)
    assert pa.is_preserved(Calibration) and pa.is_preserved(WeightsOnly)
    assert not pa.is_preserved(StructureOnly) and not pa.is_preserved(Everything)


def test_unknown_aspect_is_rejected():
    with pytest.raises(ValueError, match="unknown IR aspects"):
        PreservedAnalyses().preserve_aspects("numerics")


def test_abandon(mlp):
    am = AnalysisManager()
    for analysis in (Everything, StructureOnly, WeightsOnly):
        am.get(analysis, mlp)
    PassManager([Change(PreservedAnalyses.all().abandon(StructureOnly))])(mlp, am)
    assert set(am.cached_analyses(mlp)) == {Everything, WeightsOnly}

    pa = PreservedAnalyses().preserve_aspects(*ASPECTS).abandon(WeightsOnly)
    assert not pa.is_preserved(WeightsOnly) and pa.is_preserved(Everything)
    assert not PreservedAnalyses.all().abandon(WeightsOnly).all_preserved()
    # Preserving again after abandoning restores it.
    assert PreservedAnalyses().abandon(WeightsOnly).preserve(WeightsOnly).is_preserved(WeightsOnly)


def test_dependent_analysis_dropped_with_its_dependency(mlp):
    am = AnalysisManager()
    assert am.get(DerivedTwice, mlp) == 10
    assert set(am.cached_analyses(mlp)) == {StructureOnly, Derived, DerivedTwice}
    am.get(WeightsOnly, mlp)
    # Weights are preserved, structure is not: Derived's own aspects say keep, its dependency says drop.
    dropped = am.invalidate(mlp, PreservedAnalyses().preserve_aspects(WEIGHTS, ACTIVATIONS))
    assert set(dropped) == {StructureOnly, Derived, DerivedTwice}
    assert am.cached_analyses(mlp) == [WeightsOnly]
    assert am.get(DerivedTwice, mlp) == 10
    assert am.run_counts["t-structure"] == 2


def test_dependency_recorded_on_cache_hit(mlp):
    am = AnalysisManager()
    am.get(StructureOnly, mlp)  # cached before Derived asks for it
    am.get(Derived, mlp)
    am.invalidate(mlp, PreservedAnalyses.all().abandon(StructureOnly))
    assert am.get_cached(Derived, mlp) is None


def test_dependent_dropped_even_when_named_preserved(mlp):
    am = AnalysisManager()
    am.get(Derived, mlp)
    am.invalidate(mlp, PreservedAnalyses().preserve(Derived))
    assert am.cached_analyses(mlp) == []


def test_dependency_survives_when_only_dependent_dropped(mlp):
    am = AnalysisManager()
    am.get(Derived, mlp)
    am.invalidate(mlp, PreservedAnalyses.all().abandon(Derived))
    assert am.cached_analyses(mlp) == [StructureOnly]


def test_self_dependency_is_an_error(mlp):
    with pytest.raises(RuntimeError, match="depends on itself"):
        AnalysisManager().get(SelfLoop, mlp)


def test_params_are_part_of_the_cache_key(mlp):
    am = AnalysisManager()
    a = am.get(Calibration, mlp, samples=8)
    b = am.get(Calibration, mlp, samples=16)
    assert a == {"samples": 8, "bins": None} and b == {"samples": 16, "bins": None}
    assert am.get(Calibration, mlp, samples=8) is a
    assert am.get(Calibration, mlp) is not a
    # Unhashable params are frozen; dict order does not matter.
    c = am.get(Calibration, mlp, bins={"lo": [1, 2], "hi": 3})
    assert am.get(Calibration, mlp, bins={"hi": 3, "lo": [1, 2]}) is c
    assert am.run_counts["t-calibration"] == 4
    # Invalidation drops every parameterization.
    am.invalidate(mlp, PreservedAnalyses.none())
    assert am.get_cached(Calibration, mlp, samples=8) is None


def test_results_are_per_model():
    a, b = models.to_ir(models.mlp()), models.to_ir(models.dead_nodes())
    am = AnalysisManager()
    assert am.get(Everything, a) == ("everything", 5)
    assert am.get(Everything, b) == ("everything", 7)
    am.invalidate(a, PreservedAnalyses.none())
    assert am.get_cached(Everything, a) is None
    assert am.get_cached(Everything, b) == ("everything", 7)


def test_no_stale_result_for_a_new_model_at_a_reused_address():
    # Results are keyed by id(model); a collected model's id is soon reused by a new one.
    am = AnalysisManager()
    ids, reused = set(), 0
    for i in range(20):
        model = models.to_ir(models.mlp() if i % 2 else models.dead_nodes())
        reused += id(model) in ids
        ids.add(id(model))
        assert am.get(Everything, model) == ("everything", model.graph.num_nodes())
        assert am.get_cached(WeightsOnly, model) is None
        am.get(WeightsOnly, model)
        del model
        gc.collect(1)  # IR models hold reference cycles
    assert reused  # otherwise this test proves nothing


def test_transfer_to_a_new_model_object(mlp):
    class Replace(Pass):
        name = "t-replace"

        def run(self, model, am):
            return PassResult(models.to_ir(models.mlp()), modified=True, preserved=PreservedAnalyses.all())

    use_before, use_after = Use(Everything), Use(Everything)
    result, am = _run([use_before, Replace(), use_after], model=mlp)
    assert result.model is not mlp
    assert am.run_counts == {"t-everything": 1}
    assert am.get_cached(Everything, result.model) is use_before.seen[0]
    assert am.get_cached(Everything, mlp) is None


def test_clear(mlp):
    am = AnalysisManager()
    am.get(Derived, mlp)
    am.clear()
    assert am.cached_analyses(mlp) == []


# --- intersection --------------------------------------------------------------------------


def test_intersect_semantics():
    every = (Everything, StructureOnly, WeightsOnly, Calibration)

    def kept(pa):
        return {a for a in every if pa.is_preserved(a)}

    all_ = PreservedAnalyses.all()
    none = PreservedAnalyses.none()
    structure = PreservedAnalyses().preserve_aspects(STRUCTURE)
    weights = PreservedAnalyses().preserve_aspects(WEIGHTS).preserve(Calibration)
    assert all_.intersect(all_).all_preserved()
    assert kept(all_.intersect(structure)) == {StructureOnly}
    assert kept(structure.intersect(all_)) == {StructureOnly}
    assert kept(all_.intersect(none)) == set()
    assert kept(structure.intersect(weights)) == set()
    assert kept(weights.intersect(weights)) == {WeightsOnly, Calibration}
    # Named in one, covered by aspects in the other: kept.
    calibration_aspects = PreservedAnalyses().preserve_aspects(STRUCTURE, ACTIVATIONS)
    assert kept(weights.intersect(calibration_aspects)) == {Calibration}
    # Abandoned in either: gone, even against all().
    assert kept(all_.intersect(PreservedAnalyses.all().abandon(StructureOnly))) == set(every) - {StructureOnly}
    assert not all_.intersect(PreservedAnalyses.all().abandon(StructureOnly)).all_preserved()
    assert kept(structure.intersect(all_.abandon(StructureOnly))) == set()


def test_pass_manager_reports_intersection(mlp):
    inner = PassManager(
        [
            Change(PreservedAnalyses().preserve_aspects(STRUCTURE, WEIGHTS)),
            Change(PreservedAnalyses().preserve_aspects(STRUCTURE, ACTIVATIONS)),
        ]
    )
    result = inner(mlp, AnalysisManager())
    assert result.modified
    pa = result.effective_preserved()
    assert pa.is_preserved(StructureOnly)
    assert not pa.is_preserved(WeightsOnly) and not pa.is_preserved(Calibration)
    unchanged = PassManager([Change(modified=False), Use(Everything)])(mlp, AnalysisManager())
    assert not unchanged.modified and unchanged.effective_preserved().all_preserved()


def test_repr():
    assert repr(PreservedAnalyses.all()) == "PreservedAnalyses(all)"
    assert repr(PreservedAnalyses.none()) == "PreservedAnalyses(none)"
    text = repr(PreservedAnalyses().preserve(Calibration).preserve_aspects(WEIGHTS).abandon(Everything))
    assert text == "PreservedAnalyses(t-calibration, weights minus t-everything)"


# --- require<> / invalidate<> ---------------------------------------------------------------


def test_require_and_invalidate_pseudo_passes(mlp, scratch_registry):
    # Registration renames the class, so register a fresh subclass rather than a shared one.
    registered = register_analysis("t-structure-reg")(type("StructureReg", (StructureOnly,), {}))
    am = AnalysisManager()
    pm = parse_pipeline("require<graph-stats>,require<t-structure-reg>")
    result = pm(mlp, am)
    assert not result.modified
    stats = am.get_cached(GraphStatsAnalysis, mlp)
    assert stats is not None and stats.nodes == 5 and stats.parameters == 8 * 16 + 16 + 16 * 4 + 4
    assert am.get_cached(registered, mlp) is not None

    parse_pipeline("require<graph-stats>")(mlp, am)  # cached: not computed again
    assert am.run_counts["graph-stats"] == 1

    parse_pipeline("invalidate<graph-stats>")(mlp, am)
    assert am.get_cached(GraphStatsAnalysis, mlp) is None
    assert am.get_cached(registered, mlp) is not None

    parse_pipeline("require<graph-stats>,invalidate<all>")(mlp, am)
    assert am.cached_analyses(mlp) == []
    assert am.run_counts["graph-stats"] == 2


def test_require_keeps_analysis_across_preserving_passes(mlp, scratch_registry):
    @register_pass("t-keep-weights")
    class KeepWeights(Pass):
        """Changes the structure only."""

        def run(self, model, am):
            return PassResult(model, modified=True, preserved=PreservedAnalyses().preserve_aspects(WEIGHTS))

    @register_pass("t-keep-stats")
    class KeepStats(Pass):
        def run(self, model, am):
            return PassResult(model, modified=True, preserved=PreservedAnalyses().preserve(GraphStatsAnalysis))

    am = AnalysisManager()
    parse_pipeline("require<graph-stats>,t-keep-stats,require<graph-stats>")(mlp, am)
    assert am.run_counts["graph-stats"] == 1
    parse_pipeline("t-keep-weights,require<graph-stats>")(mlp, am)  # graph-stats needs structure too
    assert am.run_counts["graph-stats"] == 2


def test_analysis_instruments_called(mlp):
    events = []

    class Recorder(AnalysisCounter):
        def before_analysis(self, analysis, model):
            events.append(("before", analysis.name))

        def after_analysis(self, analysis, model, elapsed):
            super().after_analysis(analysis, model, elapsed)
            events.append(("after", analysis.name))

    recorder = Recorder()
    am = AnalysisManager(PassContext(instruments=[recorder]))
    am.get(Derived, mlp)
    am.get(Derived, mlp)
    assert events == [("before", "t-derived"), ("before", "t-structure"), ("after", "t-structure"), ("after", "t-derived")]
    assert recorder.counts == {"t-derived": 1, "t-structure": 1}
