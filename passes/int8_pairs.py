"""Int8 weights that onnxruntime's uint8 × int8 kernel computes exactly on every x86 CPU.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), onnxruntime's (MLAS)
uint8 × int8 GEMM multiplies activation bytes by weight bytes with
`vpmaddubsw`, which adds the two products of each pair of *adjacent input
channels* (k = 2i, 2i+1) into a *saturating* int16 before widening. With
activations a ∈ [0, 255] (int8 + 128) and weights |q| ≤ 128, the pair sum
a₀q₀ + a₁q₁ stays within int16 for every possible activation iff

    |q₂ᵢ + q₂ᵢ₊₁| ≤ 128 for every pair i (along K)

(opposite signs: at most 255·128 in magnitude; same signs: 255·|q₀ + q₁|).

`pair_limited_scale` meets the limit at the least cost in weight SQNR by widening
the scale of only the output channels that need it, just enough (the measured
alternatives: README, Results); `limit_pair_sums` then fixes what rounding pushes
over the limit by one step. `pair_sums_within` is the exact check the ort lowering
uses to pick the faster kernel.
"""

from __future__ import annotations

import numpy as np

#: The largest |q₂ᵢ + q₂ᵢ₊₁| that cannot saturate int16 with uint8 activations: 255 · 128 = 32640 ≤ 32767.
U8S8_PAIR_LIMIT = 128


def _pairs(array: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of the even and odd positions along `axis`, cut to whole pairs."""
    moved = np.moveaxis(array, axis, 0)
    whole = moved.shape[0] - moved.shape[0] % 2
    return moved[0:whole:2], moved[1:whole:2]


def pair_sums_within(quantized: np.ndarray, axis: int, limit: int = U8S8_PAIR_LIMIT) -> bool:
    """True if every pair of adjacent entries along `axis` has |q₀ + q₁| ≤ limit (and every |q| ≤ limit)."""
    q = quantized.astype(np.int32)
    if q.size == 0:
        return True
    if int(np.abs(q).max()) > limit:
        return False
    even, odd = _pairs(q, axis)
    return even.size == 0 or int(np.abs(even + odd).max()) <= limit


def pair_limited_scale(scaled: np.ndarray, axis: int, pair_axis: int, limit: int = U8S8_PAIR_LIMIT) -> np.ndarray:
    """Per-channel factors (≥ 1, one per index of `axis`) that bring every pair sum of `scaled` within `limit`.

    `scaled` is the weight divided by its per-channel scale (|values| ≤ 127);
    multiplying each channel's scale by its factor makes |r₀ + r₁| ≤ limit
    for every pair along `pair_axis` before rounding.
    """
    even, odd = _pairs(scaled, pair_axis)
    if even.size == 0:
        return np.ones(scaled.shape[axis])
    sums = np.abs(even + odd)
    channel = _moved_index(axis, pair_axis)
    worst = sums.max(axis=tuple(i for i in range(sums.ndim) if i != channel))
    return np.maximum(1.0, worst / limit)


def _moved_index(axis: int, pair_axis: int) -> int:
    """Where `axis` lands after `np.moveaxis(array, pair_axis, 0)`."""
    if axis == pair_axis:
        raise ValueError("the channel axis and the pair axis must differ")
    return axis + 1 if axis < pair_axis else axis


def limit_pair_sums(quantized: np.ndarray, scaled: np.ndarray, axis: int, limit: int = U8S8_PAIR_LIMIT) -> int:
    """Bring every pair along `axis` to |q₀ + q₁| ≤ limit in place; returns how many pairs changed.

    `quantized` holds the rounded codes and `scaled` the real values they were
    rounded from (weight / scale). A pair over the limit has one sign; its
    magnitudes move to the closest point of q₀ + q₁ = limit (each loses half
    the excess), rounded, with both kept within ±127.
    """
    q_even, q_odd = _pairs(quantized, axis)
    r_even, r_odd = _pairs(scaled, axis)
    total = q_even.astype(np.int32) + q_odd.astype(np.int32)
    over = np.abs(total) > limit
    count = int(over.sum())
    if not count:
        return 0
    sign = np.sign(total[over])
    m_even, m_odd = np.abs(r_even[over]), np.abs(r_odd[over])
    excess = m_even + m_odd - limit
    new_even = np.clip(np.rint(m_even - excess / 2), max(1, limit - 127), min(127, limit - 1))
    q_even[over] = (sign * new_even).astype(quantized.dtype)
    q_odd[over] = (sign * (limit - new_even)).astype(quantized.dtype)
    return count
