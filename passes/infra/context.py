"""`PassContext`: the settings a pipeline runs under (TVM's PassContext, as a dataclass).

Calibration settings live in `config` under `calibration.*` keys and are part
of the cache key of every calibration analysis. Passes report what they did not
manage through `remark` (see `remarks.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.instruments import PassInstrument
    from optc.passes.infra.remarks import Remark


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
    #: Every remark the passes emitted, in order (`remark`).
    remarks: list[Remark] = dataclasses.field(default_factory=list)
    #: A `missed` remark fails the pass that emitted it (`--strict`).
    strict: bool = False
    #: The names of the passes running now, innermost last (kept by `Pass.__call__`).
    pass_stack: list[str] = dataclasses.field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def remark(self, kind: str, message: str, *, matched_none: bool = False) -> Remark:
        """Record a remark of the running pass: `missed` (a structure it targets but could not handle,
        with the reason), `passed` (what it did) or `analysis`; `matched_none` when it found nothing
        it was meant for. Under `strict` a `missed` remark fails that pass once it returns."""
        from optc.passes.infra.remarks import Remark, check_remark

        check_remark(kind, message)
        remark = Remark(self.pass_stack[-1] if self.pass_stack else "optc", kind, message, matched_none)  # type: ignore[arg-type]
        self.remarks.append(remark)
        return remark
