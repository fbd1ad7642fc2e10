"""`hessian`: XᵀX of every weighted op's activation input, streamed over calibration data.

For each linear layer `Y = X·W` with a constant weight (MatMul, Gemm) the
layer-wise reconstruction objective ‖XW − XŴ‖² that GPTQ minimizes has the
Hessian H = 2·XᵀX / n over the n calibration tokens (rows of X flattened over
batch and sequence). This analysis accumulates `xtx = Σ xᵀx` with one
calibration sample's activations in memory at a time, keyed by the name of the
activation value (q/k/v share one entry), the token count and Σ|x| per
channel (AWQ's mean |x|); `hessian()` gives GPTQ's H. Each sample's xᵀx is
computed in fp32 and added to a float64 sum, which becomes fp32 once every
sample (of every rank, under torchrun) is in: the order samples are added in
then no longer shows in the fp32 result.

Params (part of the cache key):

* `values`: restrict to these activation names (per-layer use with bounded
  memory; default every weighted op's input);
* `device`: where to accumulate (default CUDA when available, else CPU).

It depends on the activations, so a pass that rescales them (`smoothquant`,
`awq`) or quantizes weights upstream invalidates it: a stale Hessian is never
reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from optc.errors import OptcError
from optc.ir import Model, Node
from optc.passes.infra.analysis import ACTIVATIONS, Analysis, AnalysisManager
from optc.passes.infra.blockwise import calibrate
from optc.passes.infra.calibration import calibration_spec
from optc.passes.infra.registry import register_analysis
from optc.passes.linear_layers import linear
from optc.runtime import distributed

#: Rows of xᵀx that `HessianStats.update` computes and adds at a time.
UPDATE_BAND = 512


def add_xtx(xtx: torch.Tensor, rows: torch.Tensor) -> None:
    """xtx += rowsᵀ·rows (the product in fp32, added in `xtx`'s dtype), a band of UPDATE_BAND rows at a time:
    a [K, K] fp32 product and its float64 copy would be 381 MB at K = 5632 (a 1B model's FFN
    down-projection input) on top of the float64 sum itself."""
    for start in range(0, rows.shape[1], UPDATE_BAND):
        xtx[start:start + UPDATE_BAND].add_(rows[:, start:start + UPDATE_BAND].T @ rows)


@dataclass
class HessianStats:
    """Σ xᵀx over the calibration tokens of one activation tensor ([K, K]; fp32 once the analysis is done)."""

    xtx: torch.Tensor
    tokens: int = 0
    #: Σ |x| per input channel ([K]; fp32 once the analysis is done), for AWQ's activation scales.
    abs_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of `x` ([..., K]) to the sums (each sample's xᵀx in fp32, added in `xtx`'s dtype)."""
        rows = x.reshape(-1, x.shape[-1]).to(device=self.xtx.device, dtype=torch.float32)
        add_xtx(self.xtx, rows)
        absolute = rows.abs().sum(dim=0).to(self.xtx.dtype)
        self.abs_sum = absolute if self.abs_sum is None else self.abs_sum + absolute
        self.tokens += int(rows.shape[0])

    def finish(self) -> None:
        """Keep the sums in fp32 (what the passes use) once every sample is in."""
        self.xtx = self.xtx.to(torch.float32)
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum.to(torch.float32)

    def mean_abs(self) -> torch.Tensor:
        """mean |x| per input channel over the calibration tokens."""
        if self.abs_sum is None:
            return torch.zeros(self.xtx.shape[0], device=self.xtx.device)
        return self.abs_sum / max(self.tokens, 1)

    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2·XᵀX / n (zeros when no token was seen)."""
        return self.xtx * (2.0 / max(self.tokens, 1))

    @property
    def channels(self) -> int:
        return int(self.xtx.shape[0])


class DeferredHessian(HessianStats):
    """`HessianStats` that keeps each sample's rows and forms the sums when `finish` is called, a band of
    xᵀx's rows at a time over the samples in the order they came, so the full float64 [K, K] sum is never
    alive: `finish` gives the same fp32 Hessian bit for bit (each sample's band product in fp32, added
    to a float64 band that starts at zero, in sample order, then made fp32).

    Worth it while the rows take less room than the float64 sum: a 1B model's FFN down-projection
    (K = 5632) has a 254 MB float64 sum, while 16 samples of 256 tokens are 92 MB of rows. Once the rows
    held would exceed the float64 sum (`K² · 8` bytes) the stored rows are added into one, in order,
    and later samples are added as they come (as `HessianStats` does): the result is the same either way.
    `xtx` is an empty [0, 0] tensor until then."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        super().__init__(torch.zeros(0, 0, dtype=torch.float64, device=device))
        self._channels = channels
        self._device = torch.device(device)
        self._rows: list[torch.Tensor] | None = []
        self._held = 0

    def update(self, x: torch.Tensor) -> None:
        if self._rows is None:
            super().update(x)
            return
        rows = x.reshape(-1, x.shape[-1]).to(device=self._device, dtype=torch.float32)
        absolute = rows.abs().sum(dim=0).to(torch.float64)
        self.abs_sum = absolute if self.abs_sum is None else self.abs_sum + absolute
        self.tokens += int(rows.shape[0])
        self._rows.append(rows)
        self._held += rows.numel() * rows.element_size()
        if self._held > self._channels * self._channels * 8:
            self._sum_now()

    def _sum_now(self) -> None:
        """Fold the stored rows into a float64 sum (in order) and add later samples as they come."""
        rows, self._rows, self._held = self._rows or [], None, 0
        self.xtx = torch.zeros(self._channels, self._channels, dtype=torch.float64, device=self._device)
        while rows:
            add_xtx(self.xtx, rows.pop(0))

    def finish(self) -> None:
        if self._rows is None:
            super().finish()
            return
        rows, self._rows, self._held = self._rows, None, 0
        k = self._channels
        out = torch.empty(k, k, dtype=torch.float32, device=self._device)
        for start in range(0, k, UPDATE_BAND):
            band = torch.zeros(min(UPDATE_BAND, k - start), k, dtype=torch.float64, device=self._device)
            for part in rows:
                band.add_(part[:, start:start + UPDATE_BAND].T @ part)
            out[start:start + UPDATE_BAND] = band.to(torch.float32)
            del band
        rows.clear()
        self.xtx = out
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum.to(torch.float32)

    @property
    def channels(self) -> int:
        return self._channels


def weighted_input(node: Node) -> str | None:
    """The activation name of `node` when it is a linear layer (`optc.passes.linear_layers.linear`), else None."""
    site = linear(node)
    return site.activation.name if site is not None else None


def default_values(model: Model) -> list[str]:
    """The activation inputs of weighted ops with constant weights, in graph order."""
    names: list[str] = []
    for node in model.graph:
        name = weighted_input(node)
        if name is not None and name not in names:
            names.append(name)
    return names


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@register_analysis("hessian")
class Hessian(Analysis[dict[str, HessianStats]]):
    """Σ XᵀX (fp32) and the token count of each weighted op's input over the calibration data."""

    depends_on = frozenset({ACTIVATIONS})

    def run(self, model: Model, am: AnalysisManager) -> dict[str, HessianStats]:
        values = list(self.params.get("values") or default_values(model))
        device = torch.device(self.params.get("device") or default_device())
        stats: dict[str, HessianStats] = {}
        if not values:
            return stats
        from optc.passes.linear_layers import torch_threads

        def update(name: str, array: np.ndarray) -> None:
            x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
            if x.ndim == 0:
                return
            entry = stats.get(name)
            if entry is None:
                k = int(x.shape[-1])
                entry = stats[name] = HessianStats(torch.zeros(k, k, dtype=torch.float64, device=device))
            entry.update(x)

        with torch_threads(device):
            calibrate(model, am.context, values, update)
            if distributed.current().distributed:
                stats = combine_over_ranks(stats, values, device)
        for entry in stats.values():
            entry.finish()
        return stats


def require_calibration(model: Model, am: AnalysisManager, who: str, need: str = "calibration data") -> None:
    """One error line, "`who` needs `need`: why", when the pipeline has no calibration data."""
    try:
        calibration_spec(model, am.context)
    except OptcError as exc:
        message = str(exc).split(": ", 1)[-1]
        raise OptcError(f"{who} needs {need}: {message}") from exc


def calibration_hessians(
    model: Model, am: AnalysisManager, who: str, values: Sequence[str] | None = None, need: str = "calibration data"
) -> dict[str, HessianStats]:
    """The `hessian` analysis (of `values` when given, else of every weighted op's input) for the pass `who`;
    without calibration data, one error line: "`who` needs `need`: why"."""
    require_calibration(model, am, who, need)
    if values is None:
        return am.get(Hessian, model)
    return am.get(Hessian, model, values=tuple(sorted(set(values))))


def combine_over_ranks(stats: dict[str, HessianStats], values: list[str], device: torch.device) -> dict[str, HessianStats]:
    """Every rank's sums over its samples added up (float64, in rank order), the same on every rank.

    Every rank calls this with the same `values`; a rank that saw no sample of a tensor adds zeros.
    """
    shape = torch.tensor([stats[name].channels if name in stats else 0 for name in values], dtype=torch.int64)
    channels = distributed.maximum(shape)
    tokens = distributed.sum_int(torch.tensor([stats[name].tokens if name in stats else 0 for name in values],
                                              dtype=torch.int64))
    combined: dict[str, HessianStats] = {}
    for name, k, n in zip(values, channels.tolist(), tokens.tolist(), strict=True):
        if not k:
            continue  # no rank saw a tensor with channels here
        entry = stats.pop(name, None)  # let each rank's own sums go as the combined ones arrive
        xtx = entry.xtx if entry is not None else torch.zeros(k, k, dtype=torch.float64, device=device)
        abs_sum = entry.abs_sum if entry is not None and entry.abs_sum is not None else \
            torch.zeros(k, dtype=torch.float64, device=device)
        combined[name] = HessianStats(distributed.sum_in_rank_order(xtx), int(n), distributed.sum_in_rank_order(abs_sum))
    return combined


__all__ = ["DeferredHessian", "Hessian", "HessianStats", "calibration_hessians", "combine_over_ranks", "default_values", "require_calibration",
           "weighted_input"]
