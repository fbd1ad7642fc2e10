"""tools/bench_w4.py --stack-timing: GPTQ of every weight of a decoder stack, timed per layer."""

from __future__ import annotations

import re

from tests.fixtures.tool_modules import tool_module


def test_stack_timing_times_each_layer_and_extrapolates():
    generator = tool_module("bench_w4")
    bench = next(generator)
    try:
        lines = bench.stack_timing("smoke", layers=1, tokens=512)
    finally:
        generator.close()
    assert re.match(r"- .+: GPTQ W4 g128 of 1 of smoke's 2 decoder layers \(7 weights, "
                    r"Hessians from 512 rows\): [\d.]+ s, [\d.]+ s per layer", lines[0]), lines
    assert re.match(r"- all 2 layers at that rate: \d+ s", lines[1]), lines
