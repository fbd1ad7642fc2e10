"""smoothquant: pattern matching, exactness in fp32 against onnxruntime, invalidation (golden: tests/golden/smoothquant/)."""

from __future__ import annotations

import numpy as np
import pytest

from optc.errors import OptcError, PassFailure, UsageError
from optc.ir import annotation, constant_array
from optc.passes import (
    ACTIVATIONS,
    STRUCTURE,
    WEIGHTS,
    Analysis,
    AnalysisManager,
    PassContext,
    VerifyEach,
    get_pass,
    parse_pipeline,
)
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.transforms.smoothquant import (
    ALPHA_GRID,
    expected_error,
    find_groups,
    search_alpha,
    smoothing_scales,
)
from tests.fixtures import models
from tests.fixtures import quant_models as qm
from tests.fixtures import text_models as tm
from tests.passes import builders as b

CALIB = {"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 16}
#: fp32 exactness: smoothing only reassociates per-channel products (x/s)·(s·w).
RTOL, ATOL = 1e-5, 1e-5


def _am():
    return AnalysisManager(PassContext(config=dict(CALIB), instruments=[VerifyEach()]))


def _run(model, pipeline, am=None):
    am = am or _am()
    return parse_pipeline(pipeline)(model, am), am


def _assert_close(proto, model, feeds):
    want = models.run_ort(proto, feeds)
    got = models.run_ort(model, feeds)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(w).max())))


def _node(model, name):
    return next(n for n in model.graph if n.name == name)


def _consumers(group):
    return [n.name for n, _ in group.consumers]


def test_llama_groups_found_by_pattern():
    model = qm.to_ir(qm.llama_block())
    groups = find_groups(model, "norm")
    assert [_consumers(g) for g in groups] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]]
    assert [g.producer for g in groups] == ["norm", "norm"]
    assert [(s.node.name, s.index) for g in groups for s in g.folds] == [("input_layernorm_scale", 0), ("post_attention_layernorm_scale", 0)]
    # targets=all adds up -> down through the SiLU gating Mul; v -> o goes through attention and is not matched.
    groups = find_groups(model, "all")
    assert [_consumers(g) for g in groups] == [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert [(s.node.name, s.index, s.axis) for s in groups[2].folds] == [("up_proj", 1, 1)]
    # The final norm feeds the tied lm_head through a Transpose: a group only when tied weights are allowed.
    assert not any(g.tied for g in groups)
    tied = [g for g in find_groups(model, "norm", tied=True) if g.tied]
    assert [[n.name for n, _ in g.tied] for g in tied] == [["lm_head"]] and not tied[0].consumers


@pytest.mark.parametrize("targets", ["norm", "all"])
@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_llama_block_outputs_unchanged(targets, alpha):
    proto = qm.llama_block()
    model = qm.to_ir(proto, vocab=64)
    result, _ = _run(model, f"smoothquant{{alpha={alpha} targets={targets}}}")
    assert result.modified
    assert result.statistics["groups-smoothed"] == (2 if targets == "norm" else 3)
    for seed in (0, 1):
        _assert_close(proto, result.model, qm.llama_feeds(seed, batch=2, seq=9))


def test_smoothing_moves_the_outliers_into_the_weights():
    proto = qm.llama_block(outliers=30.0)
    model = qm.to_ir(proto, vocab=64)
    am = _am()
    before = am.get(ActivationStats, model)["input_layernorm_out"].channel_absmax
    wq_before = constant_array(model.graph.initializers["model.layers.0.self_attn.q_proj.weight"]).copy()
    _run(model, "smoothquant{alpha=0.5}", am)
    after = am.get(ActivationStats, model)["input_layernorm_out"].channel_absmax
    spread = lambda v: v.max() / np.median(v)  # noqa: E731
    assert spread(after) < spread(before) / 2
    # W rows were scaled by s (same calibration data: s = before / after per channel).
    wq_after = constant_array(model.graph.initializers["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_allclose(wq_after / wq_before, np.broadcast_to((before / after)[:, None], wq_before.shape), rtol=1e-4)
    node = next(n for n in model.graph if n.name == "q_proj")
    assert annotation(node, "smoothquant") == {"alpha": 0.5, "input": "input_layernorm_out", "producer": "norm"}


@pytest.mark.parametrize("decomposed", [False, True])
def test_bert_block_layer_norms(decomposed):
    proto = qm.bert_block(decomposed=decomposed)
    model = qm.to_ir(proto)
    groups = find_groups(model, "norm")
    assert [_consumers(g) for g in groups] == [["query_mm", "key_mm", "value_mm"], ["fc1_mm"]]
    folds = [(s.node.name, s.index) for s in groups[1].folds]
    assert folds == ([("ln2_scale", 1), ("ln2_shift", 1)] if decomposed else [("ln2", 1), ("ln2", 2)])
    result, _ = _run(model, "smoothquant{alpha=0.5}")
    assert result.statistics["groups-smoothed"] == 2
    _assert_close(proto, result.model, qm.float_feeds(proto, 0))
    _assert_close(proto, result.model, qm.float_feeds(proto, 1, batch=1, seq=5))


def test_linear_producer_with_bias_is_folded():
    """y = (x·W1 + b1)·W2: with targets=all, 1/s goes into W1's columns and b1."""
    model = tm.text_model(
        """
g (float[2,4] x) => (float[2,3] y)
  <float[4,4] w1 = {1, 2, 0, 1, 0.5, -1, 2, 0, 3, 0.25, -2, 1, 0, 1, 1, -1},
   float[4] b1 = {0.5, -0.5, 4, 0.1},
   float[4,3] w2 = {1, 0, 2, -1, 1, 0, 0.5, 0.5, 0.5, 2, -2, 1}>
{
  h = MatMul(x, w1)
  hb = Add(h, b1)
  y = MatMul(hb, w2)
}
"""
    )
    before = b.snapshot(model)
    assert not find_groups(model, "norm")
    (group,) = find_groups(model, "all")
    assert [(s.node.op_type, s.index, s.axis) for s in group.folds] == [("MatMul", 1, 1), ("Add", 1, -1)]
    result, _ = _run(model, "smoothquant{targets=all}")
    assert result.modified
    b.assert_same_outputs(before, result.model, atol=1e-5)


def test_shared_constants_are_copied_not_changed():
    """The norm weight also feeds another op: it is copied; the q weight is shared with an unsmoothed MatMul."""
    proto = qm.llama_block()
    model = qm.to_ir(proto, vocab=64)
    graph = model.graph
    norm_w = graph.initializers["model.layers.0.input_layernorm.weight"]
    wq = graph.initializers["model.layers.0.self_attn.q_proj.weight"]
    original = constant_array(norm_w).copy(), constant_array(wq).copy()
    # A second reader of each constant: an Add of the norm weight, then a MatMul with wq on its output.
    from optc.ir import make_node

    extra = make_node("Add", [graph.outputs[0].producer().inputs[0], norm_w], name="side_add")
    side_mm = make_node("MatMul", [extra.outputs[0], wq], name="side_mm")
    graph.extend([extra, side_mm])
    graph.outputs.append(side_mm.outputs[0])
    side_mm.outputs[0].name = "side"
    before = b.snapshot(model)
    result, _ = _run(model, "smoothquant")
    assert result.statistics["constants-copied"] == 2 and result.statistics["muls-inserted"] == 0
    np.testing.assert_array_equal(constant_array(norm_w), original[0])
    np.testing.assert_array_equal(constant_array(wq), original[1])
    assert result.effective_preserved().is_preserved(_depending_on()) is False
    b.assert_same_outputs(before, result.model, feeds=qm.llama_feeds(2), atol=1e-4)


def test_producer_with_other_readers_is_left_alone():
    """The normalized tensor also feeds an Add: scaling it would change that Add."""
    model = tm.text_model(
        """
g (float[2,4] x) => (float[2,3] y, float[2,4] z)
  <float[4] g1 = {1, 2, 3, 4}, float[4,3] w = {1, 0, 2, -1, 1, 0, 0.5, 0.5, 0.5, 2, -2, 1}, float[1] axes = {-1}>
{
  sq = Mul(x, x)
  ax = Constant<value_ints=[-1]>()
  m = ReduceMean(sq, ax)
  r = Reciprocal(m)
  n = Mul(x, r)
  h = Mul(n, g1)
  y = MatMul(h, w)
  z = Add(h, x)
}
"""
    )
    assert not find_groups(model, "all")
    result, _ = _run(model, "smoothquant{insert-mul=false}")
    assert not result.modified


def test_shared_norm_output_gets_an_explicit_mul():
    """Post-LN BERT: the LayerNorm output is also the residual; the linear layers read Mul(x, 1/s) instead."""
    proto = qm.bert_block(post_ln=True)
    model = qm.to_ir(proto)
    groups = find_groups(model, "norm", insert_mul=True)
    assert [(g.producer, _consumers(g)) for g in groups] == [
        ("mul", ["query_mm", "key_mm", "value_mm"]), ("mul", ["fc1_mm"]),
    ]
    assert not find_groups(model, "norm", insert_mul=False)
    result, _ = _run(model, "smoothquant")
    assert result.statistics["muls-inserted"] == 2
    mul = _node(result.model, "ln1_smooth")
    assert mul.op_type == "Mul" and [n.name for n in mul.outputs[0].consumers()] == ["query_mm", "key_mm", "value_mm"]
    assert annotation(mul, "provenance") == "smoothquant"
    assert not result.effective_preserved().is_preserved(_depending_on(STRUCTURE))
    _assert_close(proto, result.model, qm.float_feeds(proto, 0))


def test_nothing_to_smooth_needs_no_calibration():
    model = models.to_ir(models.mlp())
    result = get_pass("smoothquant")()(model, AnalysisManager())
    assert not result.modified and result.statistics == {"groups-smoothed": 0}


def test_without_calibration_data_it_stops_with_a_clear_error():
    model = qm.to_ir(qm.llama_block())
    with pytest.raises(PassFailure, match=r"pass 'smoothquant' failed: .*calibration data"):
        parse_pipeline("smoothquant")(model, AnalysisManager())


def test_options():
    assert parse_pipeline("smoothquant{alpha=0.8 targets=all}").pipeline_text() == "smoothquant{alpha=0.8 targets=all}"
    with pytest.raises(UsageError, match="alpha"):
        parse_pipeline("smoothquant{alpha=1.5}")
    with pytest.raises(UsageError, match="targets"):
        parse_pipeline("smoothquant{targets=some}")


def test_tied_lm_head_keeps_one_table_and_the_outputs():
    """final norm → tied lm_head: the table is scaled in place, the embedding Gather gets Mul(1/s) after it."""
    proto = qm.llama_block(outliers=30.0)
    model = qm.to_ir(proto, vocab=64)
    table_name = next(n for n in model.graph if n.name == "lm_head_transpose").inputs[0].name
    before = constant_array(model.graph.initializers[table_name]).copy()
    result, _ = _run(model, 'smoothquant{alpha=0.5 exclude=""}')
    assert result.statistics["groups-smoothed"] == 3 and result.statistics["constants-copied"] == 0
    transpose = _node(result.model, "lm_head_transpose")
    table = transpose.inputs[0]
    assert table.name == table_name and len(result.model.graph.initializers) == len(model.graph.initializers)
    factor = constant_array(table) / before
    assert np.ptp(factor, axis=0).max() < 1e-5 * np.abs(factor).max()  # one factor per hidden channel
    gather = next(n for n in result.model.graph if n.op_type == "Gather")
    (mul,) = [u.node for u in gather.outputs[0].uses()]
    assert mul.op_type == "Mul"
    np.testing.assert_allclose(constant_array(mul.inputs[1]) * factor[0], 1.0, rtol=1e-5)
    assert annotation(_node(result.model, "lm_head"), "smoothquant")["input"] == "norm_out"
    for seed in (0, 1):
        _assert_close(proto, result.model, qm.llama_feeds(seed, batch=2, seq=9))


def test_exclude_skips_groups():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    result, _ = _run(model, "smoothquant{exclude=mlp.,lm_head}")
    assert result.statistics["groups-smoothed"] == 1
    assert annotation(next(n for n in model.graph if n.name == "gate_proj"), "smoothquant") is None


def _depending_on(*aspects):
    return type("A", (Analysis,), {"depends_on": frozenset(aspects or {ACTIVATIONS}), "run": lambda self, m, am: None})


def test_preserves_no_activation_statistics():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    am = _am()
    result, am = _run(model, "smoothquant", am)
    preserved = result.effective_preserved()
    assert not preserved.is_preserved(_depending_on(ACTIVATIONS))
    assert not preserved.is_preserved(_depending_on(WEIGHTS))
    assert preserved.is_preserved(_depending_on(STRUCTURE))  # only initializer contents changed here
    # The stats smoothquant used were dropped: asking again recomputes them on the smoothed model.
    assert am.get_cached(ActivationStats, model) is None
    am.get(ActivationStats, model)
    assert am.run_counts["activation-stats"] == 2


def test_scales():
    s = smoothing_scales(np.array([4.0, 0.0, 1.0, 1e12]), np.array([1.0, 2.0, 0.0, 1e-12]), 0.5)
    np.testing.assert_allclose(s, [2.0, 1.0, 1.0, 1e5])


def test_second_run_is_still_exact():
    proto = qm.llama_block()
    model = qm.to_ir(proto, vocab=64)
    result, _ = _run(model, "smoothquant{alpha=0.8},smoothquant{alpha=0.8 targets=all}")
    _assert_close(proto, result.model, qm.llama_feeds(3))


def test_calibration_error_names_missing_data_only_when_needed():
    with pytest.raises(OptcError):
        get_pass("smoothquant")()(qm.to_ir(qm.bert_block()), AnalysisManager())


def test_no_norm_is_a_remark_and_a_shared_norm_without_insert_mul_says_why():
    from tests.fixtures import prune_models as pm

    result, _ = _run(models.to_ir(models.mlp()), "smoothquant")
    assert not result.modified
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "no norm->linear pattern found", True),
    ]
    # Post-LN BERT: every LayerNorm output is also the residual; without insert-mul nothing can be folded.
    am = AnalysisManager(PassContext(config=dict(pm.CALIB)))
    result = parse_pipeline("smoothquant{insert-mul=false}")(pm.load("bert"), am)
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "0 of 4 norm->linear patterns matched: its output has other readers (insert-mul=false)", True),
    ]


def test_a_llama_block_smooths_without_a_missed_remark():
    result, _ = _run(qm.to_ir(qm.llama_block(), vocab=64), "smoothquant")
    assert result.modified
    assert [r.kind for r in result.remarks if r.kind == "missed"] == []


def test_expected_error_matches_simulated_rounding():
    """The noise model's error is what rounding X/s per tensor and s·W per column to int8 measures."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4096, 16)) * np.linspace(0.5, 8.0, 16)
    w = rng.normal(size=(16, 32))
    s = smoothing_scales(np.abs(x).max(axis=0), np.abs(w).max(axis=1), 0.5)
    xs, ws = x / s, w * s[:, None]
    step_x = np.abs(xs).max() / 127
    step_w = np.abs(ws).max(axis=0) / 127
    out = np.rint(xs / step_x) * step_x @ (np.rint(ws / step_w) * step_w)
    measured = float(np.mean(np.sum((out - x @ w) ** 2, axis=1)))
    predicted = expected_error(np.abs(x).max(axis=0), np.mean(x * x, axis=0), [w], s)
    assert predicted == pytest.approx(measured, rel=0.1)


def test_search_picks_a_smoothing_alpha_for_outlier_channels():
    """Outlier activation channels against even weights: no smoothing (α→0) is worse than the α chosen."""
    rng = np.random.default_rng(1)
    act_max = np.ones(32)
    act_max[:2] = 60.0
    meansq = (act_max / 4) ** 2
    w = rng.normal(size=(32, 48))
    w_max = np.abs(w).max(axis=1)
    alpha = search_alpha(act_max, meansq, [w], w_max)
    assert alpha in ALPHA_GRID and alpha >= 0.3
    errors = {a: expected_error(act_max, meansq, [w], smoothing_scales(act_max, w_max, a)) for a in ALPHA_GRID}
    assert errors[alpha] == min(errors.values()) < errors[0.05]


def test_search_records_each_groups_alpha_and_stays_exact():
    proto = qm.llama_block(outliers=30.0)
    model = qm.to_ir(proto, vocab=64)
    result, _ = _run(model, 'smoothquant{search=true exclude=""}')
    _assert_close(proto, result.model, qm.llama_feeds(3))
    alphas = [annotation(n, "smoothquant")["alpha"] for n in result.model.graph if annotation(n, "smoothquant")]
    assert alphas and all(a in ALPHA_GRID for a in alphas)
    assert parse_pipeline("smoothquant{search=true}").pipeline_text() == "smoothquant{search=true}"


@pytest.mark.parametrize(("shape", "axis"), [((300, 24), 1), ((24, 300), 0), ((5, 24, 7), 1)])
def test_scaling_a_band_at_a_time_gives_the_same_bytes(monkeypatch, shape, axis):
    """Weights are scaled (and their channel maxima taken) a band at a time, so a large table needs no
    float64 copy of itself; the result is the whole-array computation, bit for bit."""
    from optc.passes.transforms import smoothquant as sq

    monkeypatch.setattr(sq, "_BAND_ELEMENTS", 50)
    monkeypatch.setattr(sq, "_ROWS", 5)
    rng = np.random.default_rng(0)
    array = rng.standard_normal(shape).astype(np.float32)
    factor = rng.uniform(0.1, 10.0, shape[axis])
    banded = sq._scale_array_banded(array, factor, axis, shape[axis])
    assert banded.dtype == array.dtype and np.array_equal(banded, sq._scale_array(array, factor, axis, shape[axis]))


def test_rescaled_weights_go_to_an_attached_spill_file_at_once(tmp_path):
    """With a spill file attached (a run over its budget, or `--calib-blocks on`), every weight smoothquant
    rescales in place is moved to the file as soon as it is written, not after the whole pass."""
    from optc.ir.spill import SpillFile, attach, detach, in_memory_bytes, is_spilled

    model = qm.to_ir(qm.llama_block(hidden=64, ffn=128), vocab=64)
    spill = SpillFile(tmp_path, "sq", min_bytes=1024)
    attach(model, spill)
    try:
        _run(model, "smoothquant{alpha=0.5}")
        scaled = [v for v in model.graph.initializers.values() if v.const_value is not None and is_spilled(v.const_value)]
        assert scaled and spill.tensors_spilled == len(scaled)
        assert in_memory_bytes(model) < sum(v.const_value.nbytes for v in scaled)
    finally:
        detach(model)
        spill.close()
