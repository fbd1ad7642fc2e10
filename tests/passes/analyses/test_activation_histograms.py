"""activation-histograms: streaming fixed-bin histograms, range selection, caching and invalidation."""

from __future__ import annotations

import numpy as np
import pytest

from optc.errors import OptcError
from optc.passes import (
    ACTIVATIONS,
    STRUCTURE,
    WEIGHTS,
    AnalysisManager,
    PassContext,
    PassResult,
    PreservedAnalyses,
    get_analysis,
)
from optc.passes.analyses.activation_histograms import (
    ActivationHistograms,
    TensorHistogram,
    qmax_of,
    quantize_grid,
)
from optc.passes.analyses.activation_stats import ActivationStats
from tests.fixtures import models
from tests.fixtures import quant_models as qm

CALIB = {"calibration.spec": "random", "calibration.samples": 3, "calibration.seqlen": 8}


def _stream(seed=0, n=12, size=4000, grow=True):
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(n):
        x = (rng.standard_normal(size) * ((1 + i) if grow else 1)).astype(np.float32)
        chunks.append(x)
    return chunks


def test_rebinning_by_doubling_is_exact():
    """Streaming with a growing range gives the histogram one pass at the final width would."""
    h = TensorHistogram(bins=256)
    chunks = _stream()
    for x in chunks:
        h.update(x)
    data = np.concatenate(chunks)
    assert h.edge >= np.abs(data).max() > h.edge / 2  # a power of two just above the absmax
    assert h.edge == 2.0 ** np.ceil(np.log2(np.abs(data).max()))
    index = np.minimum((np.abs(data) * np.float32(h.bins / h.edge)).astype(np.int64), h.bins - 1)
    np.testing.assert_array_equal(np.bincount(index[data >= 0], minlength=h.bins), h.pos)
    np.testing.assert_array_equal(np.bincount(index[data < 0], minlength=h.bins), h.neg)
    assert (h.min, h.max, h.absmax) == (data.min(), data.max(), np.abs(data).max())
    assert h.count == data.size and h.samples == len(chunks)


def test_memory_does_not_grow_with_samples():
    h = TensorHistogram(bins=128)
    for x in _stream(n=40, size=500):
        h.update(x)
        assert h.pos.shape == h.neg.shape == (128,)
    assert h.pos.sum() + h.neg.sum() == 40 * 500


def test_zeros_first_then_growth_and_non_finite_values():
    h = TensorHistogram(bins=64)
    h.update(np.zeros(10, dtype=np.float32))
    assert h.edge == 0.0 and h.threshold("mse") == 0.0
    h.update(np.array([0.3, -3.0, np.inf, np.nan], dtype=np.float32))
    assert h.edge == 4.0 and h.nonfinite == 2 and h.count == 12
    assert h.pos[0] == 10  # the zeros stay in bin 0 (0.3 lands in bin 4 of width 1/16)
    assert h.abs_counts().sum() == 12
    assert h.threshold("minmax") == 3.0


def test_empty_histogram_refuses_a_range():
    with pytest.raises(OptcError, match="no calibration data"):
        TensorHistogram().threshold("minmax")


def test_bins_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        TensorHistogram(bins=100)


def test_percentile_matches_numpy_within_one_bin():
    h = TensorHistogram()
    chunks = _stream(grow=False, n=5, size=20000)
    for x in chunks:
        h.update(x)
    data = np.abs(np.concatenate(chunks))
    for p in (99.0, 99.9, 99.99):
        assert abs(h.threshold("percentile", percentile=p) - np.percentile(data, p)) <= h.width
    assert h.threshold("percentile", percentile=100.0) == pytest.approx(h.absmax, abs=h.width)


def test_a_thin_percentile_takes_mse():
    """With fewer than PERCENTILE_MIN_TAIL values beyond the cut, the 99.999th percentile of a sample is its
    maximum: the threshold is the mse one, which clips part of a lone outlier the percentile would keep whole."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 16).astype(np.float32)
    x[0] = 40.0  # one outlier in 65536 values
    h = TensorHistogram()
    h.update(x)
    assert h.percentile_is_thin(99.999) and not h.percentile_is_thin(99.9)
    assert h.threshold("percentile", percentile=99.999) == h.threshold("mse")
    assert h.threshold("percentile", percentile=99.999) < h.absmax - 5.0
    assert h.threshold("percentile", percentile=99.9) == pytest.approx(np.percentile(np.abs(x), 99.9), abs=2 * h.width)


def test_asymmetric_bounds():
    h = TensorHistogram()
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(50000) + 2.0).astype(np.float32)  # mostly positive
    h.update(data)
    assert h.bounds("minmax") == (min(float(data.min()), 0.0), float(data.max()))
    lo, hi = h.bounds("percentile", percentile=99.9)
    assert lo <= 0.0 <= hi
    assert abs(hi - np.percentile(data, 99.9)) <= 2 * h.width
    with pytest.raises(ValueError, match="minmax and percentile"):
        h.bounds("mse")


def _expected_mse(data: np.ndarray, threshold: float, fmt: str) -> float:
    scale = threshold / qmax_of(fmt)
    return float(np.mean((quantize_grid(data / scale, fmt) * scale - data) ** 2))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_mse_clips_outliers_and_beats_minmax(fmt):
    rng = np.random.default_rng(1)
    data = rng.standard_normal(100000).astype(np.float32)
    data[:5] = [40.0, -35.0, 30.0, 25.0, -20.0]  # rare outliers
    h = TensorHistogram()
    h.update(data)
    t_mse = h.threshold("mse", fmt=fmt)
    assert 0 < t_mse <= h.absmax
    if fmt == "int8":
        assert t_mse < h.absmax  # int8 gains from clipping the largest rare outliers
    # Measured on the data itself (not the histogram), the choice is at least as good as minmax.
    assert _expected_mse(data, t_mse, fmt) <= _expected_mse(data, h.absmax, fmt) * 1.001


def test_mse_keeps_the_full_range_of_uniform_data():
    data = np.linspace(-1, 1, 20001, dtype=np.float32)
    h = TensorHistogram()
    h.update(data)
    assert h.threshold("mse") >= 0.97


def test_entropy_clips_a_long_tail():
    rng = np.random.default_rng(2)
    data = rng.laplace(size=200000).astype(np.float32)
    h = TensorHistogram()
    h.update(data)
    t = h.threshold("entropy")
    assert 0 < t < h.absmax
    with pytest.raises(ValueError, match="unknown range method"):
        h.threshold("bogus")


def test_analysis_is_registered_and_streams_the_calibration_data():
    assert get_analysis("activation-histograms") is ActivationHistograms
    proto = qm.llama_block()
    model = qm.to_ir(proto, vocab=64)
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    hists = am.get(ActivationHistograms, model)
    stats = am.get(ActivationStats, model)
    # Default values: the activation inputs of every MatMul (weights and attention alike).
    assert set(hists) == set(stats)
    for name, h in hists.items():
        assert h.samples == 3
        assert h.count == stats[name].count
        assert h.absmax == pytest.approx(stats[name].absmax)
        assert (h.min, h.max) == pytest.approx((stats[name].min, stats[name].max))
        assert h.pos.sum() + h.neg.sum() == h.count


def test_analysis_on_chosen_values_and_bins():
    model = qm.to_ir(qm.bert_block())
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    hists = am.get(ActivationHistograms, model, values=("ln1",), bins=64)
    assert list(hists) == ["ln1"] and hists["ln1"].bins == 64


def _pass_result(model, *aspects):
    preserved = PreservedAnalyses().preserve_aspects(*aspects)
    return PassResult(model, True, preserved)


def test_cached_and_invalidated_with_activations():
    model = models.to_ir(models.mlp())
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    first = am.get(ActivationHistograms, model)
    assert am.get(ActivationHistograms, model) is first
    assert am.run_counts["activation-histograms"] == 1
    # A pass that keeps the activations (e.g. dce) keeps the histograms...
    am.invalidate(model, _pass_result(model, ACTIVATIONS, WEIGHTS).effective_preserved())
    assert am.get(ActivationHistograms, model) is first
    # ...one that changes weights and structure but claims activations does too (it is what they depend on)...
    am.invalidate(model, _pass_result(model, ACTIVATIONS).effective_preserved())
    assert am.get_cached(ActivationHistograms, model) is first
    # ...and one that changes activations (smoothquant, quantize) drops them.
    am.invalidate(model, _pass_result(model, STRUCTURE, WEIGHTS).effective_preserved())
    assert am.get_cached(ActivationHistograms, model) is None
    assert am.get(ActivationHistograms, model) is not first
    assert am.run_counts["activation-histograms"] == 2


def test_no_calibration_data_is_an_error():
    model = models.to_ir(models.mlp())
    with pytest.raises(OptcError, match="calibration data"):
        AnalysisManager().get(ActivationHistograms, model)
