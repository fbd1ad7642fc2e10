"""Block-by-block calibration: run a decoder one block at a time over the calibration samples.

The whole-model path (`optc.runtime.runner.ModelRunner` over the model with every wanted value
as an extra output) holds an onnxruntime copy of every weight and every wanted activation of a
sample at once. The block path (`optc.ir.patterns.blocks`) runs the prefix once per sample and
keeps each sample's residual-stream value and side values (mask, rotary tables) in an
`ActivationStore` (in memory up to a budget, then in `.npy` files read back memory-mapped); then,
for each block in turn, a session over that block alone gives the wanted values of the block to
`update(name, array)`, `after_stage(stage)` may transform the block in the model (GPTQ), and the
block, as transformed, computes the next block's inputs (true-sequential, as GPTQ's reference
code and llm-compressor's sequential pipeline do).

Which path runs is `calibration.blocks` in the pass context (`--calib-blocks`): `on`, `off`, or
`auto` (the default): blocks when the whole-model path's estimate (`WHOLE_MODEL_FACTOR` times
the weights) exceeds the memory budget (`calibration.memory_budget`, from `--memory-budget`).
Under torchrun each rank runs its own samples through every block; `after_stage` combines what
it needs over the ranks before it transforms (every rank transforms the same way).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from optc.errors import UsageError
from optc.ir import DataType, Model, initializer_bytes
from optc.ir.patterns.blocks import BlockPartition, Stage, find_blocks, stage_model
from optc.passes.infra.calibration import calibration_shard
from optc.passes.infra.context import PassContext
from optc.runtime.runner import ModelRunner

#: Pass-context keys: the path to take (`auto`, `on`, `off`) and the memory budget in bytes.
MODE_KEY = "calibration.blocks"
BUDGET_KEY = "calibration.memory_budget"
MODES = ("auto", "on", "off")
#: The whole-model path needs about this many times the weights: the IR's, onnxruntime's copy,
#: and per-sample activations and statistics of every layer.
WHOLE_MODEL_FACTOR = 3
#: Share of the memory budget the stored per-sample activations may take before going to disk.
STORE_SHARE = 0.25

Update = Callable[[str, np.ndarray], None]


def block_partition(model: Model, context: PassContext) -> BlockPartition | None:
    """The decoder's block partition when the block path is to run, else None (whole-model path).

    With `calibration.blocks=on` a model without decoder blocks is a `missed` remark; with `auto` an
    `analysis` remark (both then calibrate the whole model at once)."""
    mode = context.get(MODE_KEY) or "auto"
    if mode not in MODES:
        raise UsageError(f"calibration blocks must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if mode == "auto":
        budget = context.get(BUDGET_KEY)
        if budget is None or WHOLE_MODEL_FACTOR * initializer_bytes(model.graph) <= int(budget):
            return None
    found = find_blocks(model)
    if isinstance(found, str):
        context.remark("missed" if mode == "on" else "analysis",
                       f"calibrating the whole model at once: no decoder blocks ({found})")
        return None
    return found


class ActivationStore:
    """One dict of arrays per calibration sample: in memory up to `limit` bytes, the rest in `.npy` files
    of a temporary folder, read back memory-mapped."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.held = 0
        self._items: list[dict[str, np.ndarray] | dict[str, Path]] = []
        self.folder: Path | None = None

    def put(self, arrays: dict[str, np.ndarray]) -> None:
        size = sum(int(a.nbytes) for a in arrays.values())
        if self.limit is None or self.held + size <= self.limit:
            self.held += size
            self._items.append({k: np.asarray(a) for k, a in arrays.items()})
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="optc-activations-"))
        index = len(self._items)
        paths = {}
        for j, (name, array) in enumerate(arrays.items()):
            paths[name] = path = self.folder / f"{index}-{j}.npy"
            np.save(path, np.ascontiguousarray(array))
        self._items.append(paths)

    def get(self, index: int) -> dict[str, np.ndarray]:
        item = self._items[index]
        return {k: np.load(v, mmap_mode="r") if isinstance(v, Path) else v for k, v in item.items()}

    @property
    def spilled(self) -> bool:
        return self.folder is not None

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        self._items.clear()
        self.held = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _store_limit(context: PassContext) -> int | None:
    budget = context.get(BUDGET_KEY)
    return None if budget is None else int(int(budget) * STORE_SHARE)


def _by_stage(partition: BlockPartition, names: Iterable[str]) -> dict[str, list[str]]:
    wanted: dict[str, list[str]] = {}
    for name in names:
        stage = partition.stage_of(name)
        if stage is not None and name not in wanted.setdefault(stage.name, []):
            wanted[stage.name].append(name)
    return wanted


def run_blocks(
    model: Model,
    context: PassContext,
    partition: BlockPartition,
    names: Iterable[str],
    update: Update,
    after_stage: Callable[[Stage], bool] | None = None,
) -> None:
    """Stream this process's calibration samples through the stages in order.

    Each wanted value (`names`; those no stage computes, constants, are left out) goes to
    `update(name, array)`, sample by sample, stage by stage. After a stage's samples,
    `after_stage(stage)` runs; when it returns True it changed the stage's part of `model`,
    and the changed stage computes the next stage's inputs.
    """
    from tqdm import tqdm

    wanted = _by_stage(partition, names)
    limit = _store_limit(context)
    side = ActivationStore(None if limit is None else limit // 4)
    stream = ActivationStore(limit)
    prefix = partition.prefix
    side_names = [v.name for v in prefix.outputs[1:]]
    feed_names = sorted({v.name for s in partition.stages[1:] for v in s.inputs if v.producer() is None})
    try:
        _run_prefix(model, context, prefix, wanted.get(prefix.name, []), update, side, stream, side_names, feed_names)
        if after_stage is not None and after_stage(prefix):
            side.close()
            stream.close()
            _run_prefix(model, context, prefix, [], update, side, stream, side_names, feed_names)
        progress = tqdm(total=len(partition.stages) - 1, desc="blocks", unit="block", leave=False, disable=None)
        for stage in partition.stages[1:]:
            extras = wanted.get(stage.name, [])
            last = stage is partition.suffix
            if last and not extras:
                break
            following = ActivationStore(limit)
            keep = None if last else stage.outputs[0].name
            _run_stage(model, stage, extras, update, stream, side, following if keep else None)
            if after_stage is not None and after_stage(stage) and keep:
                following.close()
                following = ActivationStore(limit)
                _run_stage(model, stage, [], update, stream, side, following)
            stream.close()
            stream = following
            progress.update()
        progress.close()
    finally:
        side.close()
        stream.close()


def _run_prefix(model: Model, context: PassContext, prefix: Stage, extras: list[str], update: Update,
                side: ActivationStore, stream: ActivationStore, side_names: list[str], feed_names: list[str]) -> None:
    h0 = prefix.outputs[0].name
    inputs = {v.name for v in prefix.inputs}
    from_feed = [n for n in extras if n not in {o.name for o in prefix.outputs} and n in inputs]
    computed = [n for n in extras if n not in from_feed]
    sub = stage_model(model, prefix, computed)
    with ModelRunner(sub) as runner:
        for feed in calibration_shard(model, context):
            out = runner.run({k: v for k, v in feed.items() if k in inputs})
            for name in from_feed:
                update(name, feed[name])
            for name in computed:
                update(name, out[name])
            stream.put({h0: out[h0]})
            side.put({**{n: out[n] for n in side_names}, **{n: feed[n] for n in feed_names if n in feed}})


def _run_stage(model: Model, stage: Stage, extras: list[str], update: Update, stream: ActivationStore,
               side: ActivationStore, following: ActivationStore | None) -> None:
    """One session over `stage` (as `model` has it now) for every stored sample."""
    own = {v.name for v in stage.inputs}
    first = {**stream.get(0), **side.get(0)} if len(stream) else {}
    types = {k: DataType.from_numpy(np.asarray(v).dtype) for k, v in first.items() if k in own}
    sub = stage_model(model, stage, extras, types, only_extras=following is None)
    wanted = ([stage.outputs[0].name] if following is not None else []) + list(extras)
    with ModelRunner(sub) as runner:
        for i in range(len(stream)):
            feed = {k: v for k, v in {**stream.get(i), **side.get(i)}.items() if k in own}
            out = runner.run(feed, wanted)
            for name in extras:
                update(name, out[name])
            if following is not None:
                following.put({stage.outputs[0].name: out[stage.outputs[0].name]})


def calibrate(model: Model, context: PassContext, names: Iterable[str], update: Update) -> None:
    """Every wanted value of every calibration sample (of this process's share) to `update(name, array)`:
    block by block when `block_partition` says so, else through one session over the whole model."""
    names = list(names)
    partition = block_partition(model, context)
    if partition is not None:
        run_blocks(model, context, partition, names, update)
        return
    with ModelRunner(model, names) as runner:
        for feed in calibration_shard(model, context):
            for name, array in runner.run(feed, names).items():
                update(name, array)


__all__ = ["BUDGET_KEY", "MODES", "MODE_KEY", "ActivationStore", "block_partition", "calibrate", "run_blocks"]
