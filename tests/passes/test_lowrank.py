"""lowrank: truncated SVD factors, energy-chosen ranks, activation-aware whitening."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from optc.ir import annotation, constant_array, save_model
from optc.passes import AnalysisManager, PassContext, VerifyEach, parse_pipeline
from optc.passes.transforms.lowrank import factorize
from tests.fixtures import models
from tests.fixtures import quant_models as qm

CALIB = {"calibration.spec": "random", "calibration.samples": 4, "calibration.seqlen": 12}


def _run(model, pipeline, calib=CALIB):
    am = AnalysisManager(PassContext(config=dict(calib), instruments=[VerifyEach()]))
    return parse_pipeline(pipeline)(model, am)


def test_factorize_exact_for_low_rank_and_energy_choice():
    rng = np.random.default_rng(0)
    b = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 30))
    a, c = factorize(b, 0, 0.999)
    assert a.shape == (40, 3) and c.shape == (3, 30)
    np.testing.assert_allclose(a @ c, b, atol=1e-8)
    a, c = factorize(b, 2, 0.9)
    assert a.shape[1] == 2


def test_whitening_lowers_output_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 32, generator=g, dtype=torch.float64)
    x[:, :4] *= 10.0
    b = torch.randn(32, 24, generator=g, dtype=torch.float64).numpy()
    xtx = x.T @ x
    plain = factorize(b, 6, 0.9)
    white = factorize(b, 6, 0.9, xtx, damp=1e-6)
    err = [float(((x.numpy() @ (b - a @ c)) ** 2).sum()) for a, c in (plain, white)]
    assert err[1] < err[0], err


def test_llama_block_rank_and_scope():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    feeds = qm.llama_feeds(2)
    reference = models.run_ort(qm.llama_block(), feeds)[0]
    result = _run(model, "lowrank{rank=4}")
    # 16x16 layers save at rank 4 (128 < 256), 16x32 too (192 < 512); the tied lm_head is untouched.
    assert result.statistics == {"layers-factored": 7, "parameters-saved": 4 * (256 - 128) + 3 * (512 - 192)}
    factored = [n for n in result.model.graph if annotation(n, "lowrank")]
    assert len(factored) == 7 and all(annotation(n, "lowrank")["rank"] == 4 for n in factored)
    first = factored[0].inputs[0].producer()
    assert first.op_type == "MatMul" and constant_array(first.inputs[1]).shape[1] == 4
    with tempfile.TemporaryDirectory() as folder:
        save_model(result.model, Path(folder) / "m.onnx")
        out = models.run_ort(Path(folder) / "m.onnx", feeds)[0]
    assert out.shape == reference.shape and np.isfinite(out).all()


def test_full_energy_is_lossless_no_op_and_gemm():
    model = qm.to_ir(qm.llama_block(), vocab=64)
    assert not _run(model, "lowrank{energy=1.0}").modified  # full rank never saves parameters
    proto = qm.conv_gemm()
    model = models.to_ir(proto)
    feeds = qm.float_feeds(proto)
    result = _run(model, "lowrank{rank=1 whiten=true}", calib={"calibration.spec": "random", "calibration.samples": 2})
    gemm = next(n for n in result.model.graph if n.op_type == "Gemm")
    assert annotation(gemm, "lowrank")["rank"] == 1
    with tempfile.TemporaryDirectory() as folder:
        save_model(result.model, Path(folder) / "m.onnx")
        out = models.run_ort(Path(folder) / "m.onnx", feeds)[0]
    assert out.shape == models.run_ort(proto, feeds)[0].shape


def test_lower_energy_saves_more():
    saved = []
    for energy in (0.3, 0.6, 0.8):
        result = _run(qm.to_ir(qm.llama_block(), vocab=64), f"lowrank{{energy={energy}}}")
        saved.append(result.statistics.get("parameters-saved", 0))
    assert saved[0] > saved[1] >= saved[2], saved


def test_bad_options():
    with pytest.raises(Exception, match="energy"):
        parse_pipeline("lowrank{energy=0}")


def test_a_rank_that_saves_nothing_is_a_remark():
    result = _run(models.to_ir(models.mlp()), "lowrank{rank=8}")  # 8x16 and 16x4: rank 8 saves nothing
    assert not result.modified
    assert [(r.kind, r.message, r.matched_none) for r in result.remarks] == [
        ("missed", "0 of 2 linear layers factored: rank=8 would save no parameters", True),
    ]
