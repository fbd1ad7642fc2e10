"""`SpillInstrument`: after each pass, rewritten weights held in memory go to the run's spill file."""

from __future__ import annotations

from optc.ir import Model
from optc.ir.spill import SpillFile, in_memory_bytes
from optc.passes.infra.instruments import PassInstrument
from optc.passes.infra.pass_base import Pass, PassResult


class SpillInstrument(PassInstrument):
    """Move the in-memory initializers to `spill` after every pass that leaves more than `limit` bytes of them."""

    def __init__(self, spill: SpillFile, limit: int = 0) -> None:
        self.spill = spill
        self.limit = limit

    def after_pass(self, pass_: Pass, model: Model, result: PassResult, elapsed: float) -> None:
        if result.modified and in_memory_bytes(result.model) > self.limit:
            self.spill.spill(result.model)


__all__ = ["SpillInstrument"]
