"""Shared helpers of the weight-only low-bit tests (rtn, gptq, awq, lower-ort-nbits)."""

from __future__ import annotations

import numpy as np

from optc.ir import check_onnx, verify
from optc.passes import AnalysisManager, PassContext, VerifyEach, parse_pipeline
from tests.fixtures import models
from tests.fixtures import quant_models as qm

CALIB = {"calibration.spec": "random", "calibration.samples": 8, "calibration.seqlen": 32}
SEEDS = (5, 6)


def am(**config) -> AnalysisManager:
    return AnalysisManager(PassContext(config={**CALIB, **config}, instruments=[VerifyEach()]))


def run(model, pipeline: str, manager: AnalysisManager | None = None):
    result = parse_pipeline(pipeline)(model, manager or am())
    verify(result.model)
    check_onnx(result.model)
    return result


def llama(hidden: int = 64, ffn: int = 128, **kwargs):
    proto = qm.llama_block(hidden=hidden, ffn=ffn, **{"outliers": 4.0, **kwargs})
    return proto, qm.to_ir(proto, vocab=64)


def bert(hidden: int = 64, ffn: int = 128, **kwargs):
    proto = qm.bert_block(hidden=hidden, ffn=ffn, **kwargs)
    return proto, qm.to_ir(proto)


def sqnr_llama(proto, model) -> float:
    values = []
    for seed in SEEDS:
        feeds = qm.llama_feeds(seed, batch=2, seq=10)
        values.append(qm.sqnr_db(models.run_ort(proto, feeds)[0], models.run_ort(model, feeds)[0]))
    return min(values)


def sqnr_float(proto, model) -> float:
    values = []
    for seed in SEEDS:
        feeds = qm.float_feeds(proto, seed)
        values.append(qm.sqnr_db(models.run_ort(proto, feeds)[0], models.run_ort(model, feeds)[0]))
    return min(values)


def ops(model, op_type: str):
    return [n for n in model.graph if n.op_type == op_type]


def node(model, name: str):
    return next(n for n in model.graph if n.name == name)


def outputs_equal(a, b, feeds) -> float:
    """The largest absolute difference of the first output of two models on `feeds`."""
    return float(np.abs(models.run_ort(a, feeds)[0] - models.run_ort(b, feeds)[0]).max())



def run_with_ov_bits(pipeline: str):
    """`pipeline` (a low-bit pass with `ov-bits=8`) on `llama()`: (its proto, the result), checked to hold
    v_proj and o_proj at 8 bits (unsigned codes) and q_proj and down_proj at 4."""
    from optc.ir import DataType, annotation

    proto, model = llama()
    result = run(model, pipeline)
    assert result.statistics["quantized-ops"] == 7 and result.statistics["ov-bits-ops"] == 2
    for name, bits, dtype in (("v_proj", 8, DataType.UINT8), ("o_proj", 8, DataType.UINT8),
                              ("q_proj", 4, DataType.UINT4), ("down_proj", 4, DataType.UINT4)):
        assert annotation(node(result.model, name), "quant")["bits"] == bits, name
        assert node(result.model, name).inputs[1].producer().inputs[0].dtype == dtype, name
    return proto, result
