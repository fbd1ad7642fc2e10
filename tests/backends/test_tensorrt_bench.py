"""tools/bench_tensorrt.py's verdicts: the CNN Done-when is judged on the direct output difference, both readings shown."""

from __future__ import annotations

import pytest

from tests.fixtures.tool_modules import tool_module


@pytest.fixture(scope="module")
def bench():
    yield from tool_module("bench_tensorrt")


def _cnn_row(bench, *, ort: float, trt: float, diff: float, findings: int = 0, **extra):
    return bench.Row("CNN", "fp8", "fp8", findings=findings, metric={"ort": ort, "tensorrt": trt, "diff": diff, **extra},
                     size={"ort": 1000, "tensorrt": 1000})


def test_close_errors_do_not_hide_outputs_that_differ_over_one_percent(bench):
    """The CNN fp8 case: errors vs float 0.0463 / 0.0460 (Δerr 0.0003) but logits 1.09% apart: FAIL, both shown."""
    row = _cnn_row(bench, ort=0.0463, trt=0.0460, diff=0.0109, diff_no_residual=0.0)
    ok, why = bench.cnn_verdict(row)
    assert not ok
    assert "outputs differ 1.09% (> 1%)" in why and "Δerr <= 0.01 holds" in why
    line = bench.table([row], None).splitlines()[2]
    assert "err 0.0463" in line and "err 0.0460" in line
    assert "diff 0.0109, Δerr 0.0003; diff w/o residual Q/DQ 0.0000" in line
    assert line.rstrip().endswith("FAIL: outputs differ 1.09% (> 1%); Δerr <= 0.01 holds |")
    assert line.count("|") == 11  # no stray '|' from the metric names breaks the markdown row


def test_cnn_verdict_passes_under_one_percent_and_fails_on_findings(bench):
    assert bench.cnn_verdict(_cnn_row(bench, ort=0.0103, trt=0.0104, diff=0.0037)) == (
        True, "outputs differ 0.37% (<= 1%); Δerr <= 0.01 holds")
    ok, why = bench.cnn_verdict(_cnn_row(bench, ort=0.0103, trt=0.0104, diff=0.0037, findings=2))
    assert not ok and why.startswith("2 trt-check finding(s); ")
    ok, why = bench.cnn_verdict(_cnn_row(bench, ort=0.05, trt=0.07, diff=0.005))
    assert ok and "Δerr <= 0.01 fails" in why
