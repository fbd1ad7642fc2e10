"""hessian: streamed XᵀX per weighted-op input, caching, restriction and invalidation."""

from __future__ import annotations

import numpy as np
import torch

from optc.passes import ACTIVATIONS, AnalysisManager, PassContext, PreservedAnalyses, get_analysis
from optc.passes.analyses.hessian import Hessian, HessianStats, default_values
from optc.passes.infra.calibration import calibration_samples
from optc.runtime.runner import ModelRunner
from tests.fixtures import quant_models as qm

CALIB = {"calibration.spec": "random", "calibration.samples": 3, "calibration.seqlen": 8}


def _am() -> AnalysisManager:
    return AnalysisManager(PassContext(config=dict(CALIB)))


def test_registered_and_keyed_by_activation_inputs():
    assert get_analysis("hessian") is Hessian
    model = qm.to_ir(qm.llama_block(), vocab=64)
    names = default_values(model)
    # q/k/v share one input, gate/up another; o and down have their own; the tied lm_head reads a Transpose.
    assert names == ["input_layernorm_out", "attn", "post_attention_layernorm_out", "gated"]


def test_matches_a_direct_computation_over_the_samples():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    am = _am()
    stats = am.get(Hessian, model, device="cpu")
    names = default_values(model)
    assert set(stats) == set(names)
    expected = {n: np.zeros((stats[n].channels,) * 2) for n in names}
    tokens = 0
    with ModelRunner(model, names) as runner:
        for feed in calibration_samples(model, am.context):
            out = runner.run(feed, names)
            tokens += out[names[0]].reshape(-1, out[names[0]].shape[-1]).shape[0]
            for n in names:
                x = out[n].reshape(-1, out[n].shape[-1]).astype(np.float64)
                expected[n] += x.T @ x
    for n in names:
        assert stats[n].tokens == tokens == 3 * 8
        assert stats[n].xtx.dtype == torch.float32
        np.testing.assert_allclose(stats[n].xtx.numpy(), expected[n], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats[n].hessian().numpy(), 2 * expected[n] / tokens, rtol=1e-4, atol=1e-4)
        h = stats[n].hessian()
        assert torch.allclose(h, h.T)


def test_values_restrict_and_are_part_of_the_cache_key():
    model = qm.to_ir(qm.bert_block())
    am = _am()
    some = am.get(Hessian, model, values=("ln2",), device="cpu")
    assert list(some) == ["ln2"] and some["ln2"].channels == 16
    full = am.get(Hessian, model, device="cpu")
    assert set(full) == {"ln1", "context", "ln2", "act"} and full["act"].channels == 32
    assert am.get(Hessian, model, device="cpu") is full and am.run_counts["hessian"] == 2
    np.testing.assert_allclose(some["ln2"].xtx.numpy(), full["ln2"].xtx.numpy(), rtol=1e-6)


def test_invalidated_when_activations_change():
    model = qm.to_ir(qm.bert_block())
    am = _am()
    first = am.get(Hessian, model, device="cpu")
    am.invalidate(model, PreservedAnalyses().preserve_aspects("structure", "weights"))
    assert am.get_cached(Hessian, model, device="cpu") is None
    assert am.get(Hessian, model, device="cpu") is not first
    kept = am.get(Hessian, model, device="cpu")
    am.invalidate(model, PreservedAnalyses().preserve_aspects(ACTIVATIONS))
    assert am.get_cached(Hessian, model, device="cpu") is kept


def test_stats_update_is_a_running_sum():
    s = HessianStats(torch.zeros(4, 4))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 5, 4)), rng.standard_normal((3, 4))
    s.update(torch.from_numpy(a))
    s.update(torch.from_numpy(b))
    x = np.concatenate([a.reshape(-1, 4), b])
    assert s.tokens == 13
    np.testing.assert_allclose(s.xtx.numpy(), x.T @ x, rtol=1e-5)


def test_mean_abs_per_channel():
    s = HessianStats(torch.zeros(3, 3))
    x = np.array([[1.0, -2.0, 0.0], [-3.0, 2.0, 0.5]])
    s.update(torch.from_numpy(x))
    np.testing.assert_allclose(s.mean_abs().numpy(), np.abs(x).mean(axis=0))


def test_deferred_hessian_gives_the_same_fp32_sums_bit_for_bit():
    """`DeferredHessian` keeps each sample's rows and forms the sum a band at a time at `finish`; kept rows
    or, past its float64 sum's size, a running sum: either way the fp32 result is `HessianStats`'s exactly."""
    from optc.passes.analyses.hessian import UPDATE_BAND, DeferredHessian

    k = UPDATE_BAND + 29
    g = torch.Generator().manual_seed(1)
    small = [torch.randn(2, 16, k, generator=g) for _ in range(3)]  # 3·32 rows < 2·k: rows kept
    large = small + [torch.randn(4, 150, k, generator=g) for _ in range(3)]  # past k²·8 bytes: running sum
    for xs, kept in ((small, True), (large, False)):
        reference = HessianStats(torch.zeros(k, k, dtype=torch.float64))
        deferred = DeferredHessian(k)
        for x in xs:
            reference.update(x)
            deferred.update(x)
        assert (deferred.xtx.numel() == 0) is kept
        reference.finish()
        deferred.finish()
        assert deferred.xtx.dtype == torch.float32 and deferred.channels == k
        assert torch.equal(deferred.xtx, reference.xtx)
        assert torch.equal(deferred.abs_sum, reference.abs_sum)
        assert deferred.tokens == reference.tokens
        assert torch.equal(deferred.hessian(), reference.hessian())
