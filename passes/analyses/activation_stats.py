"""`activation-stats`: streaming per-tensor and per-channel ranges of activations.

For each requested value (by default the activation input of every MatMul,
Gemm and Conv) it keeps the running min, max and absolute max over all
calibration samples, the per-channel absolute max and sum of squares along
the last axis (the input channels of a MatMul), and a count of elements. One sample's
activations are in memory at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from optc.ir import Model, is_constant
from optc.ir.patterns.ops import QUANTIZED_OPS
from optc.passes.infra.analysis import ACTIVATIONS, Analysis, AnalysisManager
from optc.passes.infra.blockwise import calibrate
from optc.passes.infra.registry import register_analysis
from optc.runtime import distributed


@dataclass
class TensorStats:
    """Running statistics of one activation tensor."""

    min: float = float("inf")
    max: float = float("-inf")
    absmax: float = 0.0
    channel_absmax: np.ndarray | None = None
    #: Per-channel (last axis) sum of squares in float64, and the number of vectors summed (`rows`).
    channel_sqsum: np.ndarray | None = None
    rows: int = 0
    count: int = 0
    samples: int = 0
    shape: tuple[int, ...] = field(default=())

    def update(self, array: np.ndarray) -> None:
        data = np.asarray(array, dtype=np.float32)
        self.min = min(self.min, float(data.min()))
        self.max = max(self.max, float(data.max()))
        self.absmax = max(self.absmax, abs(self.min), abs(self.max))
        if data.ndim:
            per_channel = np.abs(data.reshape(-1, data.shape[-1])).max(axis=0)
            self.channel_absmax = per_channel if self.channel_absmax is None else np.maximum(self.channel_absmax, per_channel)
            flat = data.reshape(-1, data.shape[-1]).astype(np.float64)
            sqsum = np.einsum("ij,ij->j", flat, flat)
            self.channel_sqsum = sqsum if self.channel_sqsum is None else self.channel_sqsum + sqsum
            self.rows += flat.shape[0]
        self.count += data.size
        self.samples += 1
        self.shape = tuple(data.shape)

    @property
    def channel_meansq(self) -> np.ndarray | None:
        """Per-channel mean of x² over every vector seen (llama.cpp's importance matrix)."""
        return None if self.channel_sqsum is None or not self.rows else self.channel_sqsum / self.rows


def accumulate_calibration(model: Model, am: AnalysisManager, accumulators: dict[str, Any]) -> None:
    """Run this process's share of the calibration samples, calling `update(array)` on each value's accumulator."""
    calibrate(model, am.context, list(accumulators), lambda name, array: accumulators[name].update(array))


def default_values(model: Model) -> list[str]:
    """The activation inputs of weighted ops, in graph order."""
    names: list[str] = []
    for node in model.graph:
        if node.op_type in QUANTIZED_OPS and node.inputs and node.inputs[0] is not None:
            value = node.inputs[0]
            if not is_constant(value) and value.name not in names:
                names.append(value.name)
    return names


@register_analysis("activation-stats")
class ActivationStats(Analysis[dict[str, TensorStats]]):
    """Min/max/absmax per tensor and absmax per channel over the calibration data."""

    depends_on = frozenset({ACTIVATIONS})

    def run(self, model: Model, am: AnalysisManager) -> dict[str, TensorStats]:
        values = list(self.params.get("values") or default_values(model))
        stats = {name: TensorStats() for name in values}
        accumulate_calibration(model, am, stats)
        if distributed.current().distributed:
            combine_over_ranks(stats)
        return stats


def combine_over_ranks(stats: dict[str, TensorStats]) -> None:
    """Replace each rank's statistics of its samples with those of every rank's (the same on all ranks).

    Extremes and counts are exact; the per-channel sums of squares are float64 partial sums added in
    rank order. Every rank calls this with the same names in the same order.
    """
    import torch

    names = list(stats)
    if not names:
        return
    extremes = torch.tensor([[-s.min, s.max, s.absmax] for s in stats.values()], dtype=torch.float64)
    extremes = distributed.maximum(extremes)
    counts = torch.tensor([[s.rows, s.count, s.samples, s.channel_absmax.size if s.channel_absmax is not None else 0]
                           for s in stats.values()], dtype=torch.int64)
    channels = distributed.maximum(counts[:, 3].clone())
    counts = distributed.sum_int(counts[:, :3].clone())
    shape = _last_shape(stats)
    for i, (name, s) in enumerate(stats.items()):
        s.min, s.max, s.absmax = -float(extremes[i, 0]), float(extremes[i, 1]), float(extremes[i, 2])
        s.rows, s.count, s.samples = (int(c) for c in counts[i])
        k = int(channels[i])
        if k:
            absmax = torch.from_numpy(s.channel_absmax) if s.channel_absmax is not None else torch.zeros(k, dtype=torch.float32)
            sqsum = torch.from_numpy(s.channel_sqsum) if s.channel_sqsum is not None else torch.zeros(k, dtype=torch.float64)
            s.channel_absmax = distributed.maximum(absmax).numpy()
            s.channel_sqsum = distributed.sum_in_rank_order(sqsum).numpy()
        s.shape = shape[name]


def _last_shape(stats: dict[str, TensorStats]) -> dict[str, tuple[int, ...]]:
    """The shape each tensor had in the last calibration sample (sample n-1 lives on rank (n-1) mod N)."""
    import torch

    world = distributed.current()
    totals = distributed.sum_int(torch.tensor([s.samples for s in stats.values()], dtype=torch.int64))
    rank_of_last = {name: (int(total) - 1) % world.size for name, total in zip(stats, totals, strict=True)}
    rank = max(8, max(len(s.shape) for s in stats.values()))
    rank = int(distributed.maximum(torch.tensor([rank], dtype=torch.int64))[0])
    table = torch.full((len(stats), rank + 1), -1, dtype=torch.int64)
    for i, (name, s) in enumerate(stats.items()):
        if rank_of_last[name] == world.rank:
            table[i, 0] = len(s.shape)
            table[i, 1:len(s.shape) + 1] = torch.tensor(s.shape, dtype=torch.int64)
    table = distributed.maximum(table)
    return {name: tuple(int(d) for d in table[i, 1:int(table[i, 0]) + 1]) if table[i, 0] >= 0 else ()
            for i, name in enumerate(stats)}
