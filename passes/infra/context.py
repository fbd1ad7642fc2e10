"""`PassContext`: the settings a pipeline runs under (TVM's PassContext, as a dataclass).

Calibration settings live in `config` under `calibration.*` keys and are part
of the cache key of every calibration analysis.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.instruments import PassInstrument


@dataclasses.dataclass
class PassContext:
    """What every pass and analysis in one pipeline run can see."""

    #: Free-form settings: `calibration.spec`, `calibration.samples`, `calibration.seqlen`, ...
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Hooks around passes and analyses (timing, verification, printing...).
    instruments: list[PassInstrument] = dataclasses.field(default_factory=list)
    #: Pass names that are skipped (a pass marked `required` still runs).
    disabled: frozenset[str] = frozenset()
    #: Seed for everything random, so the same input and seed give the same output.
    seed: int = 0
    #: The model file the pipeline started from (recorded in reproducers).
    input_path: Path | None = None
    #: The compilation target ("ort", "tensorrt", "gguf"), for passes that lower differently.
    target: str = "ort"
    #: The model as it entered the pipeline, while a pipeline with a pass that sets
    #: `uses_input_model` runs (a snapshot the pass manager takes; `distill`'s teacher).
    input_model: Model | None = None

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)
