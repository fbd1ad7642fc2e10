"""The calibration data a pass asks for: what `--calib` named, streamed one sample at a time."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from optc.errors import MissingCalibrationData
from optc.ir import Model
from optc.ir.annotations import TOKENIZER
from optc.passes.infra.context import PassContext
from optc.runtime.calibration import iter_samples
from optc.runtime.distributed import shard


def calibration_spec(model: Model, context: PassContext) -> str:
    """The calibration data to use: `--calib` (`calibration.spec`); without it, a clear error.

    Ranges are never guessed: a pass that needs activations stops unless the
    user named the data. The error says which data the model could use.
    """
    spec = context.get("calibration.spec")
    if spec:
        return spec
    from optc.ir import model_metadata

    hint = "--calib builtin (the built-in text, tokenized with the model's tokenizer), " if model_metadata(model, TOKENIZER) else ""
    raise MissingCalibrationData(f"this pipeline needs calibration data and none was given: pass {hint}--calib text:FILE, npz:FILE or random")


def calibration_samples(model: Model, context: PassContext) -> Iterator[dict[str, np.ndarray]]:
    """The calibration feeds configured in the context, one sample at a time."""
    yield from iter_samples(
        model,
        calibration_spec(model, context),
        int(context.get("calibration.samples", 16)),
        int(context.get("calibration.seqlen", 256)),
        seed=context.seed,
    )


def calibration_shard(model: Model, context: PassContext) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the calibration feeds (all of them in one process; sample i on rank i mod N
    under torchrun). An analysis that reads these combines its statistics over the ranks afterwards."""
    yield from shard(calibration_samples(model, context))
