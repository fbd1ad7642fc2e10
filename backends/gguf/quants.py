"""GGUF block encoders in vectorized numpy: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K..Q6_K.

Ported from the published reference quantizers of ggml (`ggml-quants.c`:
`quantize_row_*_ref` without an importance matrix, `quantize_row_*_impl` with
one, and their helpers `make_qx_quants`, `make_q3_quants`,
`make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants`) so that blocks
agree with llama.cpp's reference quantizer bit for bit, up to rare last-bit
differences where llama.cpp's compiler fused a multiply-add.

How exactness is kept without a Python loop per block:

* data is laid out element-major, `(elements of a block, blocks)`, so every
  step runs over all blocks at once, and a sum over a block's elements is
  `array.sum(axis=0)`: numpy reduces a leading axis of a C-contiguous array
  row after row, which is the same sequential float32 accumulation as the
  C loop (`tests/backends/gguf/test_quants.py` checks this);
* all arithmetic is float32 in the C order of operations; `nearest_int` is
  round-half-to-even (`np.rint` on float32); fp16 conversions are `astype`
  (round-half-to-even, as `GGML_FP32_TO_FP16`); requantization uses the
  fp16-rounded scales, as the reference does.

The 32-element types follow `quantize_row_*_ref` without an importance
matrix and `quantize_row_*_impl` with one.

Entry point: `quantize(rows, qtype, imatrix=None)`; `rows` is float32
`[n_rows, n_per_row]` (ggml's `ne[1], ne[0]`), `imatrix` the per-column
importance (length `n_per_row`); the result is uint8 `[n_rows, bytes_per_row]`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from optc.errors import OptcError

Q = GGMLQuantizationType
QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)

#: The types this module encodes.
SUPPORTED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def f32(value: float) -> np.float32:
    return np.float32(value)


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int`: float32 round-half-to-even, as int32."""
    return np.rint(values.astype(F32, copy=False)).astype(np.int32)


def fp16_round(values: np.ndarray) -> np.ndarray:
    """float32 → fp16 → float32 (the value the decoder will see)."""
    return values.astype(np.float16).astype(F32)


def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """fp16 little-endian bytes, `[n, 2]`."""
    return np.ascontiguousarray(values.astype("<f2")).view(np.uint8).reshape(-1, 2)


def seqsum(terms: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over axis 0 (the C loop's order)."""
    return np.add.reduce(terms.astype(F32, copy=False), axis=0)


def signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block (axis 0): max |x| and the signed value that first reaches it."""
    index = np.argmax(np.abs(x), axis=0)
    signed = np.take_along_axis(x, index[None, :], axis=0)[0]
    return np.abs(signed), signed


# --------------------------------------------------------------------------- helpers ported from ggml-quants.c


def _int_range_levels(v: np.ndarray, low: int, high: int) -> np.ndarray:
    """`clamp(nearest_int(v), low, high)` as float32, computed in place in `v`.

    Rounding and clamping in float32 give the integer path's values whenever every
    `v` is below 2**31 and none is NaN (the cast of those gives INT_MIN, clamped to
    `low`); otherwise the integer path runs.
    """
    np.rint(v, out=v)
    if v.max() < F32(2**31):
        np.clip(v, F32(low), F32(high), out=v)
        return np.add(v, F32(0), out=v)  # -0.0 → +0.0, as the integer path gives
    return np.clip(v.astype(np.int32), low, high).astype(F32)


def _take_better(lev: np.ndarray, cand: np.ndarray, better: np.ndarray, work: np.ndarray) -> None:
    """`lev[:, better] = cand[:, better]` as `lev += better * (cand - lev)`: exact on small integers, and faster."""
    np.subtract(cand, lev, out=work)
    np.multiply(work, better.astype(F32)[None, :], out=work)
    np.add(lev, work, out=lev)


def make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`: signed scale per block, levels `L` in 0..2*nmax-1.

    Levels are kept as float32 (exact small integers) and every candidate reuses the same buffers.
    """
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    w = qw if qw is not None else x * x
    cf = np.empty_like(x)
    work = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-nmax) / safe_max
        lev = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
        wx = w * x
        sumlx = seqsum(wx * lev)
        suml2 = seqsum(w * lev * lev)
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / safe_max
            cand = _int_range_levels(np.multiply(iscale, x, out=cf), -nmax, nmax - 1)
            slx = seqsum(np.multiply(wx, cand, out=work))
            np.multiply(w, cand, out=work)
            sl2 = seqsum(np.multiply(work, cand, out=work))
            better = (sl2 > 0) & (slx * slx > best * sl2)
            if better.any():
                _take_better(lev, cand, better, work)
                new_scale = slx / np.where(sl2 > 0, sl2, F32(1))
                scale = np.where(better, new_scale, scale)
                best = np.where(better, scale * slx, best)
    levels = (lev.astype(np.int32) + nmax).astype(np.int32)
    levels[:, zero] = 0
    scale = np.where(zero, F32(0), scale).astype(F32)
    return scale, levels


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """`make_q3_quants(n, nmax, x, L, do_rmse=true)`: coordinate descent on the levels."""
    amax, vmax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe_max = np.where(zero, F32(1), vmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(-nmax) / safe_max
        lev = np.clip(nearest_int(iscale * x), -nmax, nmax - 1)
        scale = _refine_levels(x, x * x, lev, -nmax, nmax - 1, qp=False)
    levels = (lev + nmax).astype(np.int32)
    levels[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), levels


def make_qkx_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, *, v3: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`make_qkx2_quants` (`v3=False`) / `make_qkx3_quants` (`v3=True`): scale, positive min offset, levels.

    Levels are kept as float32 (exact small integers) and every candidate reuses the same buffers.
    """
    vmin = np.minimum(x.min(axis=0), F32(0))
    vmax = x.max(axis=0)
    sum_w = seqsum(w)
    sum_x = seqsum(w * x)
    flat = (vmax <= vmin) if v3 else (vmax == vmin)
    cf = np.empty_like(x)
    wl = np.empty_like(x)
    work = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / (vmax - vmin)
        scale = F32(1) / iscale
        lev = np.clip(nearest_int(iscale * (x - vmin)), 0, nmax).astype(F32)
        diff = scale * lev + vmin - x
        best = seqsum(w * (np.abs(diff) if use_mad else diff * diff))
        cur_min = vmin.copy()
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (vmax - cur_min)
            np.subtract(x, cur_min, out=cf)
            np.multiply(cf, iscale, out=cf)
            if v3:  # where(v > 0, nearest_int(min(v, nmax)), 0); fmax takes NaN to 0, + 0 takes -0.0 to +0.0
                np.fmax(cf, F32(0), out=cf)
                np.minimum(cf, F32(nmax), out=cf)
                np.rint(cf, out=cf)
                cand = np.add(cf, F32(0), out=cf)
            else:  # finite except in flat blocks, whose result is replaced below
                cand = _int_range_levels(cf, 0, nmax)
            np.multiply(w, cand, out=wl)
            sum_l = seqsum(wl)
            sum_l2 = seqsum(np.multiply(wl, cand, out=work))
            sum_xl = seqsum(np.multiply(wl, x, out=work))
            big_d = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / big_d
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / big_d
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            np.multiply(this_scale, cand, out=work)
            np.add(work, this_min, out=work)
            np.subtract(work, x, out=work)
            if use_mad:
                np.abs(work, out=work)
            else:
                np.multiply(work, work, out=work)
            err = seqsum(np.multiply(w, work, out=work))
            better = (big_d > 0) & (err < best)
            if better.any():
                _take_better(lev, cand, better, work)
                best = np.where(better, err, best)
                scale = np.where(better, this_scale, scale)
                cur_min = np.where(better, this_min, cur_min)
    lev = lev.astype(np.int32)
    lev[:, flat] = 0
    scale = np.where(flat, F32(0), scale).astype(F32)
    the_min = np.where(flat, -vmin, -cur_min).astype(F32)
    return scale, the_min, lev


def make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`make_qp_quants(n, nmax, x, L, quant_weights)`: a positive scale for positive values."""
    vmax = np.maximum(x.max(axis=0), F32(0))
    zero = vmax < GROUP_MAX_EPS
    safe = np.where(zero, F32(1), vmax)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = f32(nmax) / safe
        lev = nearest_int(iscale * x) & 0xFF
        scale = F32(1) / iscale
        diff = x - scale * lev.astype(F32)
        best = seqsum(qw * diff * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / safe
            scale_is = F32(1) / iscale_is
            cand = np.minimum(nearest_int(iscale_is * x), nmax)
            diff = x - scale_is * cand.astype(F32)
            mse = seqsum(qw * diff * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_is, iscale)
        lev = np.minimum(nearest_int(iscale * x), nmax) & 0xFF
        scale = _refine_levels(x, qw, lev, None, nmax, qp=True)
    lev[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), lev.astype(np.int32)


def _refine_levels(x: np.ndarray, w: np.ndarray, lev: np.ndarray, low: int | None, high: int, *, qp: bool) -> np.ndarray:
    """The five rounds of coordinate descent that end `make_q3_quants` and `make_qp_quants`.

    Each level in turn moves to the value that best fits the rest of its block, kept when the
    weighted fit improves; `lev` is updated in place and the least-squares scale returned. With
    `qp` (make_qp_quants) the move needs the sum without the level to be positive and levels are
    kept as bytes; otherwise (make_q3_quants) the sum with the new level must be. A round that
    changes nothing leaves the state as it was, so running all five is exact.
    """
    wx = w * x
    lf = lev.astype(F32)
    sumlx = seqsum(wx * lf)
    suml2 = seqsum(w * lf * lf)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = lev[i].astype(F32)
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            new_l = np.clip(nearest_int(x[i] * sl2 / slx), low, high)
            nl = new_l.astype(F32)
            slx2 = slx + wx[i] * nl
            sl22 = sl2 + w[i] * nl * nl
            positive = sl2 > 0 if qp else sl22 > 0
            accept = (slx > 0) & positive & (new_l != lev[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            lev[i] = np.where(accept, new_l & 0xFF if qp else new_l, lev[i])
            sumlx = np.where(accept, slx2, sumlx)
            suml2 = np.where(accept, sl22, suml2)
    return np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, F32(1)), F32(0))


# --------------------------------------------------------------------------- packing helpers


def _blocks(rows: np.ndarray, block: int) -> np.ndarray:
    """`[n_rows, n_per_row]` → element-major `[block, n_blocks]` float32 (blocks in row order)."""
    return np.ascontiguousarray(rows.reshape(-1, block).T.astype(F32, copy=False))


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """`[nb, 8*k]` of 0/1 → `[nb, k]` bytes, bit j of byte m ← element 8m+j (little bit order)."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 6-bit scales and mins `[nb, 8]` → the 12-byte layout of `get_scale_min_k4`."""
    ls = ls.astype(np.uint8)
    lm = lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = (ls[:, 0:4] & 63) | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = (lm[:, 0:4] & 63) | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _pack_q3_scales(ls: np.ndarray) -> np.ndarray:
    """Q3_K 6-bit biased scales `[nb, 16]` (0..63) → 12 bytes."""
    ls = ls.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:8] = (ls[:, 0:8] & 0xF) | ((ls[:, 8:16] & 0xF) << 4)
    high = ls >> 4
    for j in range(16):
        out[:, 8 + j % 4] |= (high[:, j] << (2 * (j // 4))).astype(np.uint8)
    return out


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """`[nb, 256]` 2-bit levels → 64 bytes: `qs[j/4+l] = L[j+l] | L[j+l+32]<<2 | L[j+l+64]<<4 | L[j+l+96]<<6`."""
    lv = levels.astype(np.uint8).reshape(-1, 2, 4, 32)
    packed = lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)
    return packed.reshape(-1, 64)


def _pack_nibbles_k(levels: np.ndarray) -> np.ndarray:
    """`[nb, 256]` levels (low 4 bits used) → 128 bytes: chunk c, `q[32c+l] = L[64c+l] | L[64c+32+l]<<4`."""
    lv = (levels.astype(np.uint8) & 0xF).reshape(-1, 4, 2, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)


def _requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, lo: int, hi: int, keep: np.ndarray) -> np.ndarray:
    """`L = clamp(nearest_int((x + dm)/d))` where `d != 0`; blocks with `d == 0` keep `keep`."""
    live = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        num = x + dm if dm is not None else x
        lev = np.clip(nearest_int(np.where(live, num / np.where(live, d, F32(1)), F32(0))), lo, hi)
    return np.where(live, lev, keep)


# --------------------------------------------------------------------------- k-quants


def _sub_blocks(rows: np.ndarray, sub: int) -> tuple[np.ndarray, int]:
    x = _blocks(rows, sub)
    return x, x.shape[1] // (QK_K // sub)


def _superblock_sigma2(rows: np.ndarray, factor: float) -> np.ndarray:
    """`factor * Σx² / 256` per super-block (sequential sum)."""
    xs = _blocks(rows, QK_K)
    return f32(factor) * seqsum(xs * xs) / f32(QK_K)


def _imatrix_weights(rows: np.ndarray, imatrix: np.ndarray, sub: int, sigma2: np.ndarray) -> np.ndarray:
    """`qw[i] * sqrt(sigma2 + x[i]^2)`, element-major per sub-block."""
    x = _blocks(rows, sub)
    n_rows, n_per_row = rows.shape
    qw = np.broadcast_to(imatrix.astype(F32)[None, :], (n_rows, n_per_row))
    qw = _blocks(np.ascontiguousarray(qw), sub)
    per_sub = QK_K // sub if sub <= QK_K else 1
    s2 = np.repeat(sigma2, per_sub)[None, :] if sub <= QK_K else sigma2[None, :]
    return qw * np.sqrt(s2 + x * x)


def _q4k_q5k(rows: np.ndarray, imatrix: np.ndarray | None, nmax: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K: returns d, dmin (fp16 bytes), packed scales, levels `[nb, 256]`."""
    x, nb = _sub_blocks(rows, 32)
    if imatrix is None:
        av_x = np.sqrt(seqsum(x * x) / f32(32))
        w = av_x[None, :] + np.abs(x)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, lev = make_qkx_quants(x, w, nmax, rmin, rdelta, nstep, False, v3=False)
        sc8 = scales.reshape(nb, 8)
        mn8 = mins.reshape(nb, 8)
        max_scale = np.maximum(sc8.max(axis=1), F32(0))
        max_min = np.maximum(mn8.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, F32(1)), F32(0))
            inv_min = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, F32(1)), F32(0))
        ls = np.minimum(nearest_int(inv_scale[:, None] * sc8) & 0xFF, 63)
        lm = np.minimum(nearest_int(inv_min[:, None] * mn8) & 0xFF, 63)
        d = (max_scale / f32(63)).astype(F32)
        dmin = (max_min / f32(63)).astype(F32)
    else:
        sigma2 = _superblock_sigma2(rows, 2.0)
        w = _imatrix_weights(rows, imatrix, 32, sigma2)
        sw = seqsum(w)
        scales, mins, lev = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False, v3=True)
        sw8 = np.ascontiguousarray(sw.reshape(nb, 8).T)
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 8).T), 63, sw8)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 8).T), 63, sw8)
        ls = np.minimum(ls.T, 63)
        lm = np.minimum(lm.T, 63)
    d16 = fp16_round(d)
    dmin16 = fp16_round(dmin)
    dj = (d16[:, None] * ls.astype(F32)).reshape(1, -1)
    mj = (dmin16[:, None] * lm.astype(F32)).reshape(1, -1)
    lev = _requantize(x, dj, mj, 0, nmax, lev)
    levels = np.ascontiguousarray(lev.T).reshape(nb, QK_K)
    return fp16_bytes(d), fp16_bytes(dmin), _pack_k4_scales(ls, lm), levels


def quantize_q4_k(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, dmin, scales, levels = _q4k_q5k(rows, imatrix, 15)
    return np.concatenate([d, dmin, scales, _pack_nibbles_k(levels)], axis=1)


def quantize_q5_k(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    d, dmin, scales, levels = _q4k_q5k(rows, imatrix, 31)
    high = (levels >> 4).astype(np.uint8).reshape(-1, 4, 2, 32)  # chunk c, half h, l
    qh = np.zeros((levels.shape[0], 32), np.uint8)
    for c in range(4):
        qh |= (high[:, c, 0] << (2 * c)) | (high[:, c, 1] << (2 * c + 1))
    return np.concatenate([d, dmin, scales, qh, _pack_nibbles_k(levels)], axis=1)


def quantize_q6_k(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    x, nb = _sub_blocks(rows, 16)
    qw = None
    if imatrix is not None:
        n_rows, n_per_row = rows.shape
        qw = _blocks(np.ascontiguousarray(np.broadcast_to(imatrix.astype(F32)[None, :], (n_rows, n_per_row))), 16)
    scales, lev = make_qx_quants(x, 32, qw)
    sc16 = np.ascontiguousarray(scales.reshape(nb, 16).T)
    max_abs, max_scale = signed_absmax(sc16)
    zero = max_abs < GROUP_MAX_EPS
    safe = np.where(zero, F32(-1), max_scale)
    with np.errstate(divide="ignore"):
        iscale = f32(-128) / safe
        d = F32(1) / iscale
    sc = np.minimum(nearest_int(iscale[None, :] * sc16), 127).astype(np.int8)  # [16, nb]
    d16 = fp16_round(d)
    dj = (d16[None, :] * sc.astype(F32)).T.reshape(1, -1)
    lev = _requantize(x, dj, None, -32, 31, lev - 32) + 32
    levels = np.ascontiguousarray(lev.T).reshape(nb, QK_K).astype(np.uint8)
    lv = levels.reshape(-1, 2, 4, 32)  # half, quarter, l
    ql = np.concatenate([(lv[:, :, 0] & 0xF) | ((lv[:, :, 2] & 0xF) << 4), (lv[:, :, 1] & 0xF) | ((lv[:, :, 3] & 0xF) << 4)], axis=2)
    qh = (lv[:, :, 0] >> 4) | ((lv[:, :, 1] >> 4) << 2) | ((lv[:, :, 2] >> 4) << 4) | ((lv[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.T.view(np.uint8), fp16_bytes(d)], axis=1)
    out[zero] = 0
    return out


def quantize_q3_k(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    x, nb = _sub_blocks(rows, 16)
    if imatrix is None:
        scales, lev = make_q3_quants(x, 4)
        sc16 = np.ascontiguousarray(scales.reshape(nb, 16).T)
        _, max_scale = signed_absmax(sc16)
        live = max_scale != 0
        with np.errstate(divide="ignore"):
            iscale = f32(-32) / np.where(live, max_scale, F32(1))
        ls = np.clip(nearest_int(iscale[None, :] * sc16).astype(np.int8), -32, 31).astype(np.int32) + 32
        ls = np.where(live[None, :], ls, 0).T
        d = np.where(live, F32(1) / iscale, F32(0)).astype(F32)
    else:
        sigma2 = _superblock_sigma2(rows, 2.0)
        w = _imatrix_weights(rows, imatrix, 16, sigma2)
        sw = seqsum(w)
        scales, lev = make_qx_quants(x, 4, w)
        d, ls = make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32, np.ascontiguousarray(sw.reshape(nb, 16).T))
        ls = ls.T
    d16 = fp16_round(d)
    dj = (d16[:, None] * (ls - 32).astype(F32)).reshape(1, -1)
    lev = _requantize(x, dj, None, -4, 3, lev - 4) + 4
    levels = np.ascontiguousarray(lev.T).reshape(nb, QK_K)
    hmask = _pack_bits((levels > 3).reshape(-1, 8, 32).transpose(0, 2, 1).reshape(-1, 256))
    low = np.where(levels > 3, levels - 4, levels)
    return np.concatenate([hmask, _pack_2bit(low), _pack_q3_scales(ls), fp16_bytes(d)], axis=1)


def quantize_q2_k(rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    x, nb = _sub_blocks(rows, 16)
    if imatrix is None:
        scales, mins, lev = make_qkx_quants(x, np.abs(x), 3, -0.5, 0.1, 15, True, v3=False)
        sc16 = scales.reshape(nb, 16)
        mn16 = mins.reshape(nb, 16)
        max_scale = np.maximum(sc16.max(axis=1), F32(0))
        max_min = np.maximum(mn16.max(axis=1), F32(0))
        with np.errstate(divide="ignore"):
            isc = f32(15) / np.where(max_scale > 0, max_scale, F32(1))
            imn = f32(15) / np.where(max_min > 0, max_min, F32(1))
        ls = np.where(max_scale[:, None] > 0, nearest_int(isc[:, None] * sc16), 0) & 0xFF
        lm = np.where(max_min[:, None] > 0, nearest_int(imn[:, None] * mn16), 0) & 0xFF
        d = np.where(max_scale > 0, max_scale / f32(15), F32(0)).astype(F32)
        dmin = np.where(max_min > 0, max_min / f32(15), F32(0)).astype(F32)
        packed = (ls | (lm << 4)) & 0xFF
    else:
        sigma2 = _superblock_sigma2(rows, 1.0)
        w = _imatrix_weights(rows, imatrix, 16, sigma2)
        sw = seqsum(w)
        scales, mins, lev = make_qkx_quants(x, w, 3, -0.9, 0.05, 36, False, v3=True)
        sw16 = np.ascontiguousarray(sw.reshape(nb, 16).T)
        d, ls = make_qp_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 15, sw16)
        dmin, lm = make_qp_quants(np.ascontiguousarray(mins.reshape(nb, 16).T), 15, sw16)
        packed = (ls.T | (lm.T << 4)) & 0xFF
    d16 = fp16_round(d)
    dmin16 = fp16_round(dmin)
    dj = (d16[:, None] * (packed & 0xF).astype(F32)).reshape(1, -1)
    mj = (dmin16[:, None] * (packed >> 4).astype(F32)).reshape(1, -1)
    lev = _requantize(x, dj, mj, 0, 3, lev)
    levels = np.ascontiguousarray(lev.T).reshape(nb, QK_K)
    return np.concatenate([packed.astype(np.uint8), _pack_2bit(levels), fp16_bytes(d), fp16_bytes(dmin)], axis=1)


# --------------------------------------------------------------------------- 32-element types with an importance matrix


def _weights_rowsigma(rows: np.ndarray, imatrix: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    n_rows, n_per_row = rows.shape
    qw = _blocks(np.ascontiguousarray(np.broadcast_to(imatrix.astype(F32)[None, :], (n_rows, n_per_row))), 32)
    s2 = np.repeat(sigma2, n_per_row // 32)[None, :]
    return qw * np.sqrt(s2 + x * x)


def _pack_q5_high(levels: np.ndarray) -> np.ndarray:
    """`[nb, 32]` 5-bit levels → qh (4 bytes): bit j ← bit 4 of element j."""
    return _pack_bits((levels >> 4) & 1)


def _pack_nibbles_32(levels: np.ndarray) -> np.ndarray:
    lv = levels.astype(np.uint8) & 0xF
    return lv[:, :16] | (lv[:, 16:] << 4)


def _quantize_simple_impl(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray) -> np.ndarray:
    x = _blocks(rows, 32)
    w = _weights_rowsigma(rows, imatrix, seqsum(np.ascontiguousarray(rows.T.astype(F32)) ** 2) / f32(rows.shape[1]))
    if qtype in (Q.Q4_0, Q.Q5_0):
        nmax = 8 if qtype == Q.Q4_0 else 16
        d, lev = make_qx_quants(x, nmax, w)
        levels = np.ascontiguousarray(lev.T)
        if qtype == Q.Q4_0:
            return np.concatenate([fp16_bytes(d), _pack_nibbles_32(levels)], axis=1)
        return np.concatenate([fp16_bytes(d), _pack_q5_high(levels), _pack_nibbles_32(levels)], axis=1)
    nmax = 15 if qtype == Q.Q4_1 else 31
    d, the_min, lev = make_qkx_quants(x, w, nmax, -0.9, 0.05, 36, False, v3=True)
    levels = np.ascontiguousarray(lev.T)
    m = fp16_bytes(-the_min)
    if qtype == Q.Q4_1:
        return np.concatenate([fp16_bytes(d), m, _pack_nibbles_32(levels)], axis=1)
    return np.concatenate([fp16_bytes(d), m, _pack_q5_high(levels), _pack_nibbles_32(levels)], axis=1)


# --------------------------------------------------------------------------- 32-element types, reference path


def _roundf(v: np.ndarray) -> np.ndarray:
    """C `roundf`: round half away from zero (exact: the fractional part of a float32 is exact)."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= F32(0.5), t + np.sign(v), t)


def _quantize_simple_ref(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`quantize_row_{q8_0,q4_0,q4_1,q5_0,q5_1}_ref`, all blocks at once."""
    x = _blocks(rows, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0):
            if qtype == Q.Q8_0:
                d = (np.abs(x).max(axis=0) / f32(127)).astype(F32)
            else:
                _, vmax = signed_absmax(x)
                d = (vmax / f32(-8 if qtype == Q.Q4_0 else -16)).astype(F32)
            inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
            scaled = x * inv[None, :]
            if qtype == Q.Q8_0:
                q = _roundf(scaled).astype(np.int8)
                return np.concatenate([fp16_bytes(d), np.ascontiguousarray(q.T).view(np.uint8)], axis=1)
            if qtype == Q.Q4_0:
                levels = np.minimum(np.trunc(scaled + F32(8.5)), 15).astype(np.uint8).T
                return np.concatenate([fp16_bytes(d), _pack_nibbles_32(levels)], axis=1)
            levels = np.minimum(np.trunc(scaled + F32(16.5)), 31).astype(np.uint8).T
            return np.concatenate([fp16_bytes(d), _pack_q5_high(levels), _pack_nibbles_32(levels)], axis=1)
        vmin = x.min(axis=0)
        vmax = x.max(axis=0)
        nmax = 15 if qtype == Q.Q4_1 else 31
        d = ((vmax - vmin) / f32(nmax)).astype(F32)
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
        v = np.trunc((x - vmin[None, :]) * inv[None, :] + F32(0.5))
        levels = (np.minimum(v, 15) if qtype == Q.Q4_1 else v).astype(np.int32).astype(np.uint8).T
        if qtype == Q.Q4_1:
            return np.concatenate([fp16_bytes(d), fp16_bytes(vmin), _pack_nibbles_32(levels)], axis=1)
        return np.concatenate([fp16_bytes(d), fp16_bytes(vmin), _pack_q5_high(levels), _pack_nibbles_32(levels)], axis=1)


# --------------------------------------------------------------------------- entry point

_K_QUANTS = {Q.Q2_K: quantize_q2_k, Q.Q3_K: quantize_q3_k, Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


#: Elements the encoders take at a time: their float32 temporaries then stay in the CPU's cache.
ENCODE_CHUNK_ELEMENTS = 1 << 16
#: Q3_K without an importance matrix runs a Python loop per element of a block (`make_q3_quants`),
#: whose overhead small chunks would repeat: it takes larger ones.
Q3_K_CHUNK_ELEMENTS = 1 << 18


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    size, type_size = GGML_QUANT_SIZES[qtype]
    return n_per_row // size * type_size


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode float32 rows `[n_rows, n_per_row]` as `qtype`; uint8 `[n_rows, bytes_per_row]`.

    With `imatrix` (per-column importance, length `n_per_row`) the weighted
    `_impl` algorithms run, as `ggml_quantize_chunk` does; Q8_0 ignores it.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED:
        raise OptcError(f"GGUF type {qtype.name} is not supported by optc's encoder (supported: {', '.join(t.name for t in SUPPORTED)})")
    rows = np.asarray(rows, dtype=F32)
    if rows.ndim != 2:
        raise OptcError(f"GGUF encoding needs 2-D rows, got shape {list(rows.shape)}")
    n_rows, n_per_row = rows.shape
    if n_per_row % block_size(qtype):
        raise OptcError(f"rows of {n_per_row} elements do not divide into {qtype.name} blocks of {block_size(qtype)}")
    if imatrix is not None:
        imatrix = np.asarray(imatrix, dtype=F32).reshape(-1)
        if imatrix.shape[0] != n_per_row:
            raise OptcError(f"importance matrix has {imatrix.shape[0]} columns, the rows have {n_per_row}")
    if n_rows == 0:
        return np.zeros((0, row_bytes(qtype, n_per_row)), np.uint8)
    out = np.empty((n_rows, row_bytes(qtype, n_per_row)), np.uint8)
    chunk_elements = Q3_K_CHUNK_ELEMENTS if qtype == Q.Q3_K and imatrix is None else ENCODE_CHUNK_ELEMENTS
    step = max(1, chunk_elements // n_per_row)  # rows are independent: any split gives the same bytes
    for start in range(0, n_rows, step):
        chunk = rows[start:start + step]
        out[start:start + len(chunk)] = _encode(chunk, qtype, imatrix).reshape(len(chunk), -1)
    return out


def _encode(rows: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None) -> np.ndarray:
    if qtype in _K_QUANTS:
        return _K_QUANTS[qtype](rows, imatrix)
    if imatrix is not None and qtype != Q.Q8_0:
        return _quantize_simple_impl(rows, qtype, imatrix)
    return _quantize_simple_ref(rows, qtype)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """ggml's reference dequantizer (from the `gguf` package): float32 `[n_rows, n_per_row]`."""
    values = gguf_quants.dequantize(np.ascontiguousarray(data, dtype=np.uint8), GGMLQuantizationType(qtype))
    return np.asarray(values, dtype=F32).reshape(-1, n_per_row)
