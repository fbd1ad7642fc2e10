"""`activation-histograms`: streaming fixed-bin histograms of activations and range selection.

For each requested value (by default the activation input of every MatMul,
Gemm and Conv, as for `activation-stats`) one calibration run keeps:

* the exact running min, max and absolute max, the element count;
* a histogram of fixed size: `bins` bins for the positive half-line and
  `bins` for the negative one, both over `[0, edge]` by distance from zero.

**Growing range: re-binning by doubling, in a single pass.** The first
non-zero sample sets `edge` to the power of two at or above its absolute max.
When a later sample exceeds `edge`, the edge doubles (as many times as
needed) and every 2^k neighbouring bins merge into one. Because the edge stays
a power of two times the first one and the bins stay aligned at zero, the
merged histogram is exactly the histogram that binning every sample at the new
width would have given: nothing is approximated by re-binning, and only the
resolution drops (the data always spans at least half the bins). Memory is
`2 * bins` counters per tensor whatever the number of samples; one sample's
activations are in memory at a time. Non-finite values are counted apart
(`nonfinite`) and left out of the histogram.

Range selection (`TensorHistogram.threshold`, symmetric: a clipping threshold
T on |x|; `TensorHistogram.bounds` for asymmetric [lo, hi]):

* `minmax`: the exact absolute max (min and max);
* `percentile`: the upper edge of the bin where the cumulative share of |x|
  reaches `percentile`% (never above the absolute max); asymmetric uses the
  (100 − p)% and p% points of the signed histogram. With fewer than
  `PERCENTILE_MIN_TAIL` values beyond the cut the sample's percentile is
  (nearly) its maximum, not an estimate of the distribution's, so a symmetric
  threshold takes `mse` instead (`TensorHistogram.percentile_is_thin`);
* `mse`: the bin edge T (up to the absolute max) that minimizes the
  expected squared quantization error of the histogram, each bin's count at
  its centre, under the target format: an integer grid of `qmax` steps per
  side (int8: 127, int16: 32767) or FP8 E4M3 (scale T / 448, rounded with
  ml_dtypes); searched coarse to fine (every ~N/256-th edge, then every edge
  around the best);
* `entropy`: TensorRT's KL-divergence calibration on the |x| histogram (the
  threshold whose 128-level quantized distribution diverges least), searched
  coarse to fine the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from optc.errors import OptcError
from optc.ir import Model
from optc.passes.analyses.activation_stats import accumulate_calibration, default_values
from optc.passes.infra.analysis import ACTIVATIONS, Analysis, AnalysisManager
from optc.passes.infra.registry import register_analysis
from optc.runtime import distributed

#: Range-selection methods, for options and messages.
METHODS = ("minmax", "percentile", "mse", "entropy")
#: Default bins per half-line.
DEFAULT_BINS = 2048
#: The fewest calibration values beyond the cut that make a `percentile` range an estimate.
PERCENTILE_MIN_TAIL = 10
#: Largest finite FLOAT8E4M3FN value.
FP8_E4M3_MAX = 448.0


@dataclass
class TensorHistogram:
    """Streaming statistics and a fixed-bin histogram of one tensor."""

    bins: int = DEFAULT_BINS
    #: Counts by distance from zero: pos[i] holds x in [i*w, (i+1)*w), neg[i] holds -x in (i*w, (i+1)*w].
    pos: np.ndarray = field(default=None)  # type: ignore[assignment]
    neg: np.ndarray = field(default=None)  # type: ignore[assignment]
    #: Upper edge of the histogram (a power of two), 0 while only zeros were seen.
    edge: float = 0.0
    min: float = float("inf")
    max: float = float("-inf")
    absmax: float = 0.0
    count: int = 0
    nonfinite: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        if self.bins < 16 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two of at least 16, got {self.bins}")
        if self.pos is None:
            self.pos = np.zeros(self.bins, dtype=np.int64)
        if self.neg is None:
            self.neg = np.zeros(self.bins, dtype=np.int64)

    @property
    def width(self) -> float:
        return self.edge / self.bins

    def update(self, array: np.ndarray) -> None:
        data = np.asarray(array, dtype=np.float32).ravel()
        self.samples += 1
        finite = np.isfinite(data)
        if not finite.all():
            self.nonfinite += int(data.size - finite.sum())
            data = data[finite]
        if data.size == 0:
            return
        lo, hi = float(data.min()), float(data.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.absmax = max(self.absmax, abs(lo), abs(hi))
        self.count += int(data.size)
        if self.absmax > self.edge:
            self._grow(self.absmax)
        if self.edge == 0.0:  # only zeros so far: they belong to bin 0 at any width
            self.pos[0] += data.size
            return
        scale = self.bins / self.edge
        index = np.minimum((np.abs(data) * scale).astype(np.int64), self.bins - 1)
        negative = data < 0
        self.pos += np.bincount(index[~negative], minlength=self.bins)
        self.neg += np.bincount(index[negative], minlength=self.bins)

    def _grow(self, needed: float) -> None:
        """Double the edge until it covers `needed`, merging 2^k neighbouring bins."""
        if self.edge == 0.0:
            mantissa, exponent = math.frexp(needed)  # needed = mantissa * 2**exponent, 0.5 <= mantissa < 1
            self.edge = math.ldexp(1.0, exponent - 1) if mantissa == 0.5 else math.ldexp(1.0, exponent)
            return
        k = 0
        edge = self.edge
        while edge < needed:
            edge *= 2.0
            k += 1
        self.edge = edge
        self.pos = _merge(self.pos, k)
        self.neg = _merge(self.neg, k)

    # ------------------------------------------------------------------ range selection

    def abs_counts(self) -> np.ndarray:
        """The histogram of |x| over [0, edge]."""
        return self.pos + self.neg

    def threshold(self, method: str = "minmax", *, percentile: float = 99.99, fmt: str = "int8") -> float:
        """A symmetric clipping threshold T > 0 on |x| (scale = T / qmax of `fmt`); a thin `percentile`
        (`percentile_is_thin`) takes `mse`."""
        if self.count == 0:
            raise OptcError("no calibration data reached this tensor (no finite values)")
        if self.absmax == 0.0:
            return 0.0
        if method == "percentile" and self.percentile_is_thin(percentile):
            method = "mse"
        if method == "minmax":
            return self.absmax
        counts = self.abs_counts()
        if method == "percentile":
            return min(self.absmax, _percentile_edge(counts, self.width, percentile))
        if method == "mse":
            return _mse_threshold(counts, self.width, self.absmax, fmt)
        if method == "entropy":
            return min(self.absmax, _entropy_threshold(counts, self.width))
        raise ValueError(f"unknown range method {method!r}; expected one of {', '.join(METHODS)}")

    def percentile_is_thin(self, percentile: float) -> bool:
        """Whether fewer than `PERCENTILE_MIN_TAIL` (but some) values lie beyond the `percentile` cut."""
        return 0 < self.count * (1.0 - percentile / 100.0) < PERCENTILE_MIN_TAIL

    def sqnr_db(self, threshold: float, fmt: str = "int8") -> float:
        """Expected SQNR (dB) of quantizing this tensor symmetrically at `threshold` in `fmt`.

        Each bin's count sits at its centre, as for `mse`; the estimate ranks
        tensors by how much a format's grid costs them (`quantize{min-sqnr}`).
        """
        counts = self.abs_counts().astype(np.float64)
        if self.count == 0 or self.absmax == 0.0 or threshold <= 0.0:
            return math.inf
        centers = np.minimum((np.arange(counts.size, dtype=np.float64) + 0.5) * self.width, self.absmax)
        scale = threshold / qmax_of(fmt)
        noise = float(((quantize_grid(centers / scale, fmt) * scale - centers) ** 2) @ counts)
        signal = float((centers**2) @ counts)
        return math.inf if noise == 0.0 else 10.0 * math.log10(signal / noise)

    def bounds(self, method: str = "minmax", *, percentile: float = 99.99) -> tuple[float, float]:
        """An asymmetric range [lo, hi] containing 0 (minmax or percentile)."""
        if self.count == 0:
            raise OptcError("no calibration data reached this tensor (no finite values)")
        if method == "minmax":
            return min(self.min, 0.0), max(self.max, 0.0)
        if method == "percentile":
            total = self.count
            tail = total * (1.0 - percentile / 100.0)
            hi = _tail_edge(self.pos, self.width, tail)
            lo = -_tail_edge(self.neg, self.width, tail)
            return max(self.min, min(lo, 0.0)), min(self.max, max(hi, 0.0))
        raise ValueError(f"asymmetric ranges support minmax and percentile, not {method!r}")


def _merge(counts: np.ndarray, k: int) -> np.ndarray:
    """Merge every 2^k neighbouring bins into one (the first len/2^k bins of the result)."""
    n = counts.size
    out = np.zeros_like(counts)
    if k == 0:
        return counts.copy()
    if (1 << k) >= n:
        out[0] = counts.sum()
        return out
    out[: n >> k] = counts.reshape(n >> k, 1 << k).sum(axis=1)
    return out


def _percentile_edge(counts: np.ndarray, width: float, percentile: float) -> float:
    total = counts.sum()
    cumulative = np.cumsum(counts)
    index = int(np.searchsorted(cumulative, total * percentile / 100.0, side="left"))
    return (min(index, counts.size - 1) + 1) * width


def _tail_edge(counts: np.ndarray, width: float, tail: float) -> float:
    """The smallest edge beyond which at most `tail` elements of this half lie."""
    beyond = np.cumsum(counts[::-1])[::-1]  # beyond[i]: elements in bins i..end
    inside = np.nonzero(beyond > tail)[0]
    return (int(inside[-1]) + 1) * width if inside.size else 0.0


def quantize_grid(x: np.ndarray, fmt: str) -> np.ndarray:
    """Round values already divided by the scale onto the format's grid (clipping included)."""
    if fmt == "fp8":
        import ml_dtypes

        clipped = np.clip(x, -FP8_E4M3_MAX, FP8_E4M3_MAX)
        return clipped.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    qmax = qmax_of(fmt)
    return np.clip(np.rint(x), -qmax, qmax)


def qmax_of(fmt: str) -> float:
    """Largest representable magnitude of a symmetric format (in units of the scale)."""
    return {"int8": 127.0, "int16": 32767.0, "uint8": 255.0, "fp8": FP8_E4M3_MAX}[fmt]


def _mse_threshold(counts: np.ndarray, width: float, absmax: float, fmt: str) -> float:
    """The threshold among the bin edges (and absmax) with the least expected squared error.

    Searched coarse to fine: every `stride`-th edge first (at most ~256), then
    every edge within one stride of the best coarse one.
    """
    last = int(np.nonzero(counts)[0][-1])
    used = counts[: last + 1].astype(np.float64)
    centers = (np.arange(last + 1, dtype=np.float64) + 0.5) * width
    centers[-1] = min(centers[-1], absmax)
    candidates = np.unique(np.append(np.arange(1, last + 2, dtype=np.float64) * width, absmax))
    candidates = candidates[candidates <= absmax]
    qmax = qmax_of(fmt)

    def errors(thresholds: np.ndarray) -> np.ndarray:
        scale = thresholds[:, None] / qmax
        return ((quantize_grid(centers[None, :] / scale, fmt) * scale - centers[None, :]) ** 2) @ used

    stride = max(1, candidates.size // 256)
    coarse = np.unique(np.append(np.arange(0, candidates.size, stride), candidates.size - 1))
    best = int(coarse[int(np.argmin(errors(candidates[coarse])))])
    fine = np.arange(max(0, best - stride), min(candidates.size, best + stride + 1))
    return float(candidates[fine[int(np.argmin(errors(candidates[fine])))]])


def _entropy_threshold(counts: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT's entropy calibration: the threshold minimizing KL(P || Q) with `levels` quantized bins."""
    last = int(np.nonzero(counts)[0][-1])
    hist = counts[: last + 1].astype(np.float64)
    if hist.size <= levels:
        return (last + 1) * width

    def kl_at(i: int) -> float:
        reference = hist[:i].copy()
        reference[-1] += hist[i:].sum()  # outliers clip into the last bin
        nonzero = hist[:i] != 0
        # Quantize hist[:i] into `levels` bins, then expand back over the non-zero source bins.
        index = np.minimum((np.arange(i) * levels) // i, levels - 1)
        sums = np.bincount(index, weights=hist[:i], minlength=levels)
        support = np.bincount(index, weights=nonzero.astype(np.float64), minlength=levels)
        expanded = np.where(nonzero, sums[index] / np.maximum(support[index], 1), 0.0)
        p = reference / reference.sum()
        q_total = expanded.sum()
        if q_total == 0:
            return math.inf
        q = expanded / q_total
        mask = p > 0
        if np.any(q[mask] == 0):
            return math.inf
        return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))

    # Coarse to fine over the number of kept bins i (TensorRT scans every i from `levels` up).
    stride = max(1, (hist.size - levels) // 128)
    coarse = list(range(levels, hist.size + 1, stride))
    best = min(coarse, key=kl_at)
    fine = range(max(levels, best - stride), min(hist.size, best + stride) + 1)
    return min(fine, key=kl_at) * width


@register_analysis("activation-histograms")
class ActivationHistograms(Analysis[dict[str, TensorHistogram]]):
    """Fixed-bin histograms (with exact min/max/absmax) of activations over the calibration data.

    Parameters (part of the cache key): `values`, a tuple of value names
    (default: the activation inputs of every MatMul, Gemm and Conv) and
    `bins`, bins per half-line (a power of two, default 2048).
    """

    depends_on = frozenset({ACTIVATIONS})

    def run(self, model: Model, am: AnalysisManager) -> dict[str, TensorHistogram]:
        values = list(self.params.get("values") or default_values(model))
        bins = int(self.params.get("bins", DEFAULT_BINS))
        histograms = {name: TensorHistogram(bins=bins) for name in values}
        if not values:
            return histograms
        accumulate_calibration(model, am, histograms)
        if distributed.current().distributed:
            combine_over_ranks(histograms)
        return histograms


def combine_over_ranks(histograms: dict[str, TensorHistogram]) -> None:
    """Replace each rank's histograms of its samples with those of every rank's, exactly (all integer counts).

    Each rank first re-bins its histogram to the largest edge of any rank (doubling, exact as in
    `_grow`); then the counts add up. Every rank calls this with the same names in the same order.
    """
    import torch

    if not histograms:
        return
    items = list(histograms.values())
    extremes = torch.tensor([[-h.min, h.max, h.absmax, h.edge] for h in items], dtype=torch.float64)
    extremes = distributed.maximum(extremes)
    for h, edge in zip(items, extremes[:, 3].tolist(), strict=True):
        if edge > h.edge:
            if h.edge == 0.0:  # only zeros (or nothing) here: they stay in bin 0 at any width
                h.edge = edge
            else:
                h._grow(edge)
    counts = torch.from_numpy(np.stack([np.concatenate([h.pos, h.neg, [h.count, h.nonfinite, h.samples]])
                                        for h in items]).astype(np.int64))
    counts = distributed.sum_int(counts).numpy()
    for i, h in enumerate(items):
        h.min, h.max, h.absmax = -float(extremes[i, 0]), float(extremes[i, 1]), float(extremes[i, 2])
        h.pos, h.neg = counts[i, :h.bins].copy(), counts[i, h.bins:2 * h.bins].copy()
        h.count, h.nonfinite, h.samples = (int(c) for c in counts[i, 2 * h.bins:])


__all__ = [
    "DEFAULT_BINS",
    "FP8_E4M3_MAX",
    "METHODS",
    "ActivationHistograms",
    "TensorHistogram",
    "qmax_of",
    "quantize_grid",
]
