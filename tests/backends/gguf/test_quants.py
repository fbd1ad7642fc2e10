"""optc's GGUF block encoders against llama.cpp's own quantizer (`ggml_quantize_chunk`), block for block.

The oracle is the libggml-base that llama-cpp-python ships (skipped when it is
not installed); round trips use the `gguf` package's reference dequantizers.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from optc.backends.gguf import quants as gq
from optc.errors import OptcError
from tests.backends.ggml_oracle import ggml_quantize, load_ggml

TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
#: Worst relative RMS round-trip error on Gaussian data, per type (loose: catches layout bugs, not tuning).
MAX_REL_RMSE = {
    Q.Q8_0: 0.01, Q.Q4_0: 0.15, Q.Q4_1: 0.12, Q.Q5_0: 0.08, Q.Q5_1: 0.06,
    Q.Q2_K: 0.45, Q.Q3_K: 0.25, Q.Q4_K: 0.12, Q.Q5_K: 0.06, Q.Q6_K: 0.03,
}


@pytest.fixture(scope="module")
def ggml():
    lib = load_ggml()
    if lib is None:
        pytest.skip("llama-cpp-python (libggml-base) is not installed")
    return lib


def weights(rows: int = 24, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Heavy-tailed weights plus the edge cases: zero rows and blocks, constants, one spike, ties, tiny and huge values."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)
    w[0] = 0.0
    w[1, :256] = 0.25
    w[2, :] = 0.0
    w[2, 17] = -1.5
    w[3] = np.round(w[3] * 64) / 64  # many exact ties
    w[4] *= 1e-12
    w[5] *= 1e4
    w[6, :32] = -0.5
    w[7] = np.abs(w[7])
    w[8] = -np.abs(w[8])
    return w


def importance(cols: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    im = (rng.random(cols) ** 4 * 8).astype(np.float32)
    im[:3] = 0.0
    return im


def identical_blocks(a: np.ndarray, b: np.ndarray, qtype: Q) -> float:
    size = GGML_QUANT_SIZES[qtype][1]
    return float((a.reshape(-1, size) == b.reshape(-1, size)).all(axis=1).mean())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["ref", "imatrix"])
def test_blocks_match_llama_cpp(ggml, qtype, with_imatrix):
    w = weights()
    im = importance(w.shape[1]) if with_imatrix else None
    expected = ggml_quantize(ggml, w, qtype, gq.row_bytes(qtype, w.shape[1]), im)
    got = gq.quantize(w, qtype, im)
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert identical_blocks(got, expected, qtype) == 1.0


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_round_trip_error(qtype):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 768)).astype(np.float32)
    back = gq.dequantize(gq.quantize(w, qtype), qtype, w.shape[1])
    rel = float(np.sqrt(np.mean((back - w) ** 2)) / np.sqrt(np.mean(w**2)))
    assert rel < MAX_REL_RMSE[qtype]
    zeros = np.zeros((2, 256), np.float32)
    assert np.array_equal(gq.dequantize(gq.quantize(zeros, qtype), qtype, 256), zeros)


def test_imatrix_lowers_weighted_error():
    """With an importance matrix the error where it is large shrinks (the objective the encoder minimizes)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    im = np.where(np.arange(512) % 7 == 0, 50.0, 0.1).astype(np.float32)
    for qtype in (Q.Q4_K, Q.Q3_K, Q.Q5_0):
        plain = gq.dequantize(gq.quantize(w, qtype), qtype, 512)
        weighted = gq.dequantize(gq.quantize(w, qtype, im), qtype, 512)
        assert (im * (weighted - w) ** 2).sum() < (im * (plain - w) ** 2).sum()


def test_seqsum_is_sequential():
    """The reduction the encoders rely on adds rows in order, as the C loops do."""
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((32, 1000)) * 1e3).astype(np.float32)
    expected = np.zeros(1000, np.float32)
    for row in a:
        expected = expected + row
    assert np.array_equal(gq.seqsum(a), expected)


def test_deterministic():
    w = weights(seed=4)
    assert np.array_equal(gq.quantize(w, Q.Q4_K), gq.quantize(w.copy(), Q.Q4_K))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.Q4_1])
def test_row_chunks_give_the_same_bytes(monkeypatch, qtype):
    """`quantize` encodes in row chunks; any chunk size gives the bytes of one pass over all rows."""
    w = weights(seed=5)
    im = importance(w.shape[1])
    whole = [gq.quantize(w, qtype), gq.quantize(w, qtype, im)]
    monkeypatch.setattr(gq, "ENCODE_CHUNK_ELEMENTS", w.shape[1] * 3)
    monkeypatch.setattr(gq, "Q3_K_CHUNK_ELEMENTS", w.shape[1] * 5)
    assert np.array_equal(gq.quantize(w, qtype), whole[0])
    assert np.array_equal(gq.quantize(w, qtype, im), whole[1])


def test_float_levels_match_the_integer_path():
    """`_int_range_levels` gives `clamp(nearest_int(v))`, NaN and values past int32 included."""
    v = np.array([[-3.5, -0.5, 0.5, 1.5, 2.49, 7.6, -1e10, 1e3]], np.float32)
    odd = np.array([[np.nan, 3e9, np.inf, -np.inf, 2.5]], np.float32)
    with np.errstate(invalid="ignore"):
        for values in (v, odd):
            expected = np.clip(gq.nearest_int(values), -2, 6).astype(np.float32)
            got = gq._int_range_levels(values.copy(), -2, 6)
            assert np.array_equal(got, expected) and not np.signbit(got[got == 0]).any()
    assert not np.signbit(gq._int_range_levels(np.array([[-0.3, -0.0]], np.float32), -2, 6)).any()


def test_bad_inputs():
    with pytest.raises(OptcError, match="do not divide into Q4_K blocks of 256"):
        gq.quantize(np.zeros((2, 320), np.float32), Q.Q4_K)
    with pytest.raises(OptcError, match="not supported"):
        gq.quantize(np.zeros((2, 256), np.float32), Q.IQ2_XXS)
    with pytest.raises(OptcError, match="importance matrix has 3 columns"):
        gq.quantize(np.zeros((2, 256), np.float32), Q.Q4_K, np.ones(3, np.float32))
    assert gq.quantize(np.zeros((0, 256), np.float32), Q.Q6_K).shape == (0, 210)
