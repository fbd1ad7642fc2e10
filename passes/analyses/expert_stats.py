"""`expert-stats`: Σ x² per channel of an activation, per expert of a mixture of experts.

In the exported form of transformers' `batched_mm` experts, every routed (token, expert) pair is
one row of the activations between the experts' projections, and a GatherND picks each row's
expert weights by an index `[rows, 1]`. For each requested pair (activation, indices, channel
axis) this analysis sums x² of every channel over the rows routed to each expert, and counts those
rows: the per-expert form of the diagonal of XᵀX that `prune-ffn` ranks a dense MLP's channels by.

Params (part of the cache key): `pairs`, a tuple of (activation name, indices name, channel axis
of the activation, number of experts), each indices value in at most one pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.ir import Model
from optc.passes.infra.analysis import ACTIVATIONS, Analysis, AnalysisManager
from optc.passes.infra.blockwise import calibrate
from optc.passes.infra.registry import register_analysis
from optc.runtime import distributed


@dataclass
class ExpertChannelStats:
    """Σ x² per (expert, channel) `[E, F]` (float64) and the rows routed to each expert `[E]`."""

    squares: np.ndarray
    rows: np.ndarray

    def add(self, activation: np.ndarray, indices: np.ndarray, axis: int) -> None:
        """Add one sample's rows: `activation` with its channels on `axis`, `indices` one expert per row."""
        channels = np.moveaxis(np.asarray(activation, np.float64), axis, -1)
        experts = np.asarray(indices, np.int64).reshape(-1)
        channels = channels.reshape(experts.shape[0], -1)
        np.add.at(self.squares, experts, channels * channels)
        self.rows += np.bincount(experts, minlength=self.rows.shape[0])


@register_analysis("expert-stats")
class ExpertStats(Analysis[dict[str, ExpertChannelStats]]):
    """Per expert, Σ x² of each channel of an activation over the calibration rows routed to it."""

    depends_on = frozenset({ACTIVATIONS})

    def run(self, model: Model, am: AnalysisManager) -> dict[str, ExpertChannelStats]:
        pairs = list(self.params.get("pairs") or ())
        shapes = {v.name: v.shape for n in model.graph for v in n.outputs}
        stats: dict[str, ExpertChannelStats] = {}
        by_indices: dict[str, tuple[str, int]] = {}
        for activation, indices, axis, count in pairs:
            width = int(shapes[activation][axis])
            stats[activation] = ExpertChannelStats(np.zeros((count, width)), np.zeros(count, np.int64))
            by_indices[indices] = (activation, axis)
        pending: dict[str, np.ndarray] = {}  # this sample's value of each pair's half that came first

        def update(name: str, array: np.ndarray) -> None:
            if name in by_indices:
                activation, axis = by_indices[name]
                if activation in pending:
                    stats[activation].add(pending.pop(activation), array, axis)
                    return
            else:
                indices = next(i for i, (a, _) in by_indices.items() if a == name)
                if indices in pending:
                    stats[name].add(array, pending.pop(indices), by_indices[indices][1])
                    return
            pending[name] = array

        calibrate(model, am.context, [name for pair in pairs for name in pair[:2]], update)
        if distributed.current().distributed:
            _combine_over_ranks(stats)
        return stats


def _combine_over_ranks(stats: dict[str, ExpertChannelStats]) -> None:
    """Every rank's sums over its samples added up, in rank order (the same on every rank)."""
    import torch

    for entry in stats.values():
        entry.squares = distributed.sum_in_rank_order(torch.from_numpy(entry.squares)).numpy()
        entry.rows = distributed.sum_int(torch.from_numpy(entry.rows)).numpy()


__all__ = ["ExpertChannelStats", "ExpertStats"]
