"""expert-stats: Σ x² per channel and rows per expert, from the routing indices of stacked experts."""

from __future__ import annotations

import numpy as np

from optc.passes import AnalysisManager, PassContext
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.analyses.expert_stats import ExpertChannelStats, ExpertStats
from tests.fixtures import prune_models as pm

CALIB = {"calibration.spec": "random", "calibration.samples": 3, "calibration.seqlen": 8}

def test_rows_are_summed_under_their_expert():
    stats = ExpertChannelStats(np.zeros((3, 2)), np.zeros(3, np.int64))
    activation = np.array([[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]])  # [rows, F, 1]: channels on axis -2
    stats.add(activation, np.array([[2], [0], [2]]), axis=-2)
    np.testing.assert_array_equal(stats.squares, [[9, 16], [0, 0], [26, 40]])
    np.testing.assert_array_equal(stats.rows, [1, 0, 2])


def test_the_analysis_splits_the_channel_sums_by_routed_expert():
    model = pm.experts()
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    stats = am.get(ExpertStats, model, pairs=(("hu", "idx", -2, 2),))["hu"]
    assert stats.squares.shape == (2, 2) and stats.rows.sum() == 3 * 4  # 3 samples of 4 rows
    total = am.get(ActivationStats, model, values=("h",))["h"].channel_sqsum  # every row, whatever its expert
    np.testing.assert_allclose(stats.squares.sum(axis=0), total, rtol=1e-5)
