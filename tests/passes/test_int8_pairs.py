"""`optc.passes.int8_pairs`: pair-limited int8 weights, exact in onnxruntime's u8s8 kernel on any x86 CPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from optc.backends.ort import lower_ort_int8 as lowering
from optc.passes.int8_pairs import (
    U8S8_PAIR_LIMIT,
    limit_pair_sums,
    pair_limited_scale,
    pair_sums_within,
)


def _codes(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed real values scaled to ±127 per column, and their rounded int8 codes."""
    scaled = rng.standard_t(3, size=shape)
    scaled = scaled / np.abs(scaled).max(axis=0, keepdims=True) * 127
    return np.clip(np.rint(scaled), -127, 127).astype(np.int8), scaled


@pytest.mark.parametrize("axis", [0, 1])
def test_limit_pair_sums_meets_the_limit_with_the_smallest_change(axis):
    rng = np.random.default_rng(0)
    quantized, scaled = _codes(rng, (64, 48))
    before = quantized.copy()
    assert not pair_sums_within(before, axis)  # the planted weights do break the limit
    changed = limit_pair_sums(quantized, scaled, axis)
    assert changed > 0 and pair_sums_within(quantized, axis)
    even_b, odd_b = np.moveaxis(before, axis, 0)[0::2].astype(int), np.moveaxis(before, axis, 0)[1::2].astype(int)
    even_a, odd_a = np.moveaxis(quantized, axis, 0)[0::2].astype(int), np.moveaxis(quantized, axis, 0)[1::2].astype(int)
    over = np.abs(even_b + odd_b) > U8S8_PAIR_LIMIT
    assert int(over.sum()) == changed
    # Pairs within the limit are untouched; those over it land on the limit, keep their sign, and each
    # code moves by about half the excess (at most half plus one rounding step).
    np.testing.assert_array_equal(even_a[~over], even_b[~over])
    np.testing.assert_array_equal(odd_a[~over], odd_b[~over])
    assert np.all(np.abs(even_a[over] + odd_a[over]) == U8S8_PAIR_LIMIT)
    assert np.all(np.sign(even_a[over]) == np.sign(even_b[over]))
    excess = np.abs(even_b[over] + odd_b[over]) - U8S8_PAIR_LIMIT
    assert np.all(np.abs(even_a[over] - even_b[over]) <= excess / 2 + 1.5)
    assert np.abs(quantized.astype(int)).max() <= 127


@pytest.mark.parametrize(("axis", "pair_axis"), [(1, 0), (0, 1)])
def test_pair_limited_scale_widens_only_the_channels_that_need_it(axis, pair_axis):
    rng = np.random.default_rng(2)
    _, scaled = _codes(rng, (64, 48))
    scaled = scaled if axis == 1 else scaled.T.copy()  # channels along `axis`, pairs along `pair_axis`
    factors = pair_limited_scale(scaled, axis, pair_axis)
    assert factors.shape == (48,) and np.all(factors >= 1.0)
    moved = np.moveaxis(scaled, pair_axis, 0)
    sums = np.abs(moved[0::2] + moved[1::2]).max(axis=0)
    np.testing.assert_allclose(factors, np.maximum(1.0, sums / U8S8_PAIR_LIMIT))
    widened = scaled / np.expand_dims(factors, pair_axis)
    moved = np.moveaxis(widened, pair_axis, 0)
    assert np.abs(moved[0::2] + moved[1::2]).max() <= U8S8_PAIR_LIMIT + 1e-9
    assert 0 < np.mean(factors > 1.0) < 1  # some channels, not all


def test_pair_sums_within_reads_pairs_along_the_axis():
    q = np.zeros((4, 3), np.int8)
    q[0, 0] = q[1, 0] = 100  # a pair along axis 0 (rows 0, 1): 200
    assert not pair_sums_within(q, 0)
    assert pair_sums_within(q, 1)  # along axis 1 those entries are in different pairs
    q[1, 0] = 28
    assert pair_sums_within(q, 0)  # 128: the limit itself is safe
    odd = np.full((3, 1), 127, np.int8)  # an odd length: the last entry has no partner
    odd[1] = -127
    assert pair_sums_within(odd, 0)


def _u8s8_session(weight: np.ndarray) -> ort.InferenceSession:
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMulIntegerToFloat", ["x", "w", "x_scale", "w_scale", "x_zp", "w_zp"], ["y"], domain="com.microsoft")],
        "u8s8",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(np.float32(1.0), "x_scale"),
            numpy_helper.from_array(np.ones(n, np.float32), "w_scale"),
            numpy_helper.from_array(np.uint8(128), "x_zp"),
            numpy_helper.from_array(np.zeros(n, np.int8), "w_zp"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_limited_weights_are_exact_in_onnxruntimes_u8s8_kernel():
    """Extreme activations (0 and 255) against limited weights: bit-exact; the raw weights saturate on AVX2 hosts."""
    rng = np.random.default_rng(1)
    quantized, scaled = _codes(rng, (96, 32))
    activations = rng.choice(np.array([0, 255], np.uint8), size=(16, 96))
    raw = _u8s8_session(quantized).run(None, {"x": activations})[0]
    raw_exact = (activations.astype(np.int64) - 128) @ quantized.astype(np.int64)
    limit_pair_sums(quantized, scaled, 0)
    got = _u8s8_session(quantized).run(None, {"x": activations})[0]
    want = (activations.astype(np.int64) - 128) @ quantized.astype(np.int64)
    np.testing.assert_array_equal(got, want.astype(np.float32))
    if lowering.host_kernel()[0] == "u8u8":  # x86 without VNNI: the reason the limit exists
        assert np.abs(raw - raw_exact).max() > 0
