"""expert-stats: Σ x² per channel and rows per expert, from the routing indices of stacked experts."""

from __future__ import annotations

import numpy as np

from optc.ir import parse_text
from optc.passes import AnalysisManager, PassContext
from optc.passes.analyses.activation_stats import ActivationStats
from optc.passes.analyses.expert_stats import ExpertChannelStats, ExpertStats

CALIB = {"calibration.spec": "random", "calibration.samples": 3, "calibration.seqlen": 8}

#: Two experts of width 2 on hidden 2, routed by the sign of x0 - x1 (tests/golden/prune-ffn/experts.onnxtxt).
EXPERTS = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[4,2] x) => (float[4,2] y)
  <float[2,2] w_router = {1.0, -1.0, -1.0, 1.0},
   float[2,4,2] w_gate_up = {2.0, 1.0, 0.01, 0.02, 1.0, 2.0, 0.02, 0.01,
                             0.01, 0.02, -2.0, 1.0, 0.02, 0.01, 1.0, -2.0},
   float[2,2,2] w_down = {1.0, 0.1, 0.5, 0.1, 0.1, 1.0, 0.1, -0.5},
   int64[1] last = {2},
   float[4,2] logits, int64[4,1] idx, float[4,4,2] wgu, float[4,2,1] xu, float[4,4,1] gu, float[4,4] gus,
   float[4,2] g, float[4,2] u, float[4,2] sg, float[4,2] a, float[4,2] h, float[4,2,1] hu,
   float[4,2,2] wd, float[4,2,1] yd>
{
  logits = MatMul(x, w_router)
  idx = ArgMax <axis = 1, keepdims = 1> (logits)
  wgu = GatherND(w_gate_up, idx)
  xu = Unsqueeze(x, last)
  gu = MatMul(wgu, xu)
  gus = Squeeze(gu, last)
  g, u = Split <axis = 1, num_outputs = 2> (gus)
  sg = Sigmoid(g)
  a = Mul(g, sg)
  h = Mul(a, u)
  hu = Unsqueeze(h, last)
  wd = GatherND(w_down, idx)
  yd = MatMul(wd, hu)
  y = Squeeze(yd, last)
}
"""


def test_rows_are_summed_under_their_expert():
    stats = ExpertChannelStats(np.zeros((3, 2)), np.zeros(3, np.int64))
    activation = np.array([[[1.0], [2.0]], [[3.0], [4.0]], [[5.0], [6.0]]])  # [rows, F, 1]: channels on axis -2
    stats.add(activation, np.array([[2], [0], [2]]), axis=-2)
    np.testing.assert_array_equal(stats.squares, [[9, 16], [0, 0], [26, 40]])
    np.testing.assert_array_equal(stats.rows, [1, 0, 2])


def test_the_analysis_splits_the_channel_sums_by_routed_expert():
    model = parse_text(EXPERTS)
    am = AnalysisManager(PassContext(config=dict(CALIB)))
    stats = am.get(ExpertStats, model, pairs=(("hu", "idx", -2, 2),))["hu"]
    assert stats.squares.shape == (2, 2) and stats.rows.sum() == 3 * 4  # 3 samples of 4 rows
    total = am.get(ActivationStats, model, values=("h",))["h"].channel_sqsum  # every row, whatever its expert
    np.testing.assert_allclose(stats.squares.sum(axis=0), total, rtol=1e-5)
