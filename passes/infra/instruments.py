"""Pass instrumentation: hooks around passes and analyses, and the standard instruments.

Instruments run in order before a pass and in reverse order after it (MLIR's
stack order). Verification is an instrument, as in LLVM and MLIR.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.pass_base import Pass, PassResult


class PassInstrument:
    """Base class: override the hooks you need; all default to doing nothing."""

    def should_run(self, pass_: Pass, model: Model) -> bool:
        return True

    def before_pass(self, pass_: Pass, model: Model) -> None:
        pass

    def after_pass(self, pass_: Pass, model: Model, result: PassResult, elapsed: float) -> None:
        pass

    def after_pass_failed(self, pass_: Pass, model: Model, error: BaseException) -> None:
        pass

    def before_analysis(self, analysis: type, model: Model) -> None:
        pass

    def after_analysis(self, analysis: type, model: Model, elapsed: float) -> None:
        pass

    def after_analysis_failed(self, analysis: type, model: Model, error: BaseException) -> None:
        pass


def _is_container(pass_: Pass) -> bool:
    from optc.passes.infra.pass_manager import PassManager

    return isinstance(pass_, PassManager)


class TimingInstrument(PassInstrument):
    """`--timing`: wall time of every pass and analysis, printed as a table.

    Passes and analyses nest (a pass computes the analyses it needs, an
    analysis those it depends on), so each row shows its own time: a pass's
    row leaves out the analyses it ran, which get rows of their own. Every
    second is then counted once, and the total is the wall time of the
    outermost passes (and of analyses computed outside any pass).
    """

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float]] = []  # (kind, name, seconds of its own)
        self.total = 0.0  # wall time of the outermost passes and analyses
        self._nested: list[float] = []  # per running pass or analysis: the time of what ran inside it

    def before_pass(self, pass_, model) -> None:
        self._nested.append(0.0)

    def after_pass(self, pass_, model, result, elapsed) -> None:
        own = self._finish(elapsed)
        if not _is_container(pass_):
            self.rows.append(("pass", pass_.pipeline_text(), own))

    def after_pass_failed(self, pass_, model, error) -> None:
        self._nested.pop()

    def before_analysis(self, analysis, model) -> None:
        self._nested.append(0.0)

    def after_analysis(self, analysis, model, elapsed) -> None:
        self.rows.append(("analysis", analysis.name or analysis.__name__, self._finish(elapsed)))

    def after_analysis_failed(self, analysis, model, error) -> None:
        self._nested.pop()

    def _finish(self, elapsed: float) -> float:
        """Close the innermost frame: charge its time to the enclosing one (or the total); its own time."""
        inner = self._nested.pop()
        if self._nested:
            self._nested[-1] += elapsed
        else:
            self.total += elapsed
        return max(elapsed - inner, 0.0)

    def report(self) -> str:
        total = self.total
        share = total or 1e-12
        lines = ["===-- optc timing report --===", f"{'seconds':>10}  {'share':>6}  name"]
        for kind, name, seconds in self.rows:
            label = name if kind == "pass" else f"[analysis] {name}"
            lines.append(f"{seconds:10.4f}  {100 * seconds / share:5.1f}%  {label}")
        lines.append(f"{total:10.4f}  100.0%  total")
        return "\n".join(lines)

    def as_dict(self) -> list[dict[str, Any]]:
        return [{"kind": k, "name": n, "seconds": round(s, 6)} for k, n, s in self.rows]


def fingerprint(model: Model) -> str:
    """A hash of the IR: its text with weights elided, plus the identity of every weight object.

    A pass that replaces a weight must store a new tensor object, so weight
    changes are seen without reading weight data.
    """
    from optc.ir import print_ir

    digest = hashlib.sha256(print_ir(model, max_elements=0).encode())
    for name, value in model.graph.initializers.items():
        digest.update(f"{name}:{id(value.const_value)};".encode())
    return digest.hexdigest()


class PrintIRAfterChange(PassInstrument):
    """`--print-ir-after-change`: print the IR after each pass that changed it (by fingerprint)."""

    def __init__(self, stream: TextIO | None = None, max_elements: int = 16) -> None:
        self.stream = stream
        self.max_elements = max_elements
        self._before: list[str] = []

    def before_pass(self, pass_, model) -> None:
        self._before.append(fingerprint(model) if not _is_container(pass_) else "")

    def after_pass(self, pass_, model, result, elapsed) -> None:
        before = self._before.pop()
        if _is_container(pass_) or fingerprint(result.model) == before:
            return
        from optc.ir import print_ir

        out = self.stream or sys.stderr
        out.write(f"// -----// IR Dump After {pass_.pipeline_text()} //----- //\n")
        out.write(print_ir(result.model, max_elements=self.max_elements))

    def after_pass_failed(self, pass_, model, error) -> None:
        self._before.pop()


class VerifyEach(PassInstrument):
    """`--verify-each`: run the IR verifier after every pass; a failure names the pass."""

    def after_pass(self, pass_, model, result, elapsed) -> None:
        from optc.ir import verify

        if not _is_container(pass_):
            verify(result.model, where=f"after pass '{pass_.pipeline_text()}'")


class StatisticsInstrument(PassInstrument):
    """Per-pass statistics: node counts before and after, and each pass's own counters."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._nodes_before: list[int] = []

    def before_pass(self, pass_, model) -> None:
        self._nodes_before.append(model.graph.num_nodes())

    def after_pass(self, pass_, model, result, elapsed) -> None:
        before = self._nodes_before.pop()
        if _is_container(pass_):
            return
        self.rows.append(
            {
                "pass": pass_.pipeline_text(),
                "modified": result.modified,
                "nodes-before": before,
                "nodes-after": result.model.graph.num_nodes(),
                **result.statistics,
            }
        )

    def after_pass_failed(self, pass_, model, error) -> None:
        self._nodes_before.pop()

    def report(self) -> str:
        lines = ["===-- optc pass statistics --==="]
        for row in self.rows:
            extra = {k: v for k, v in row.items() if k not in ("pass", "modified", "nodes-before", "nodes-after")}
            counters = "".join(f", {k}={v}" for k, v in extra.items())
            lines.append(f"{row['pass']}: nodes {row['nodes-before']} -> {row['nodes-after']}{counters}")
        return "\n".join(lines)


class AnalysisCounter(PassInstrument):
    """Counts how often each analysis is computed (used by tests and reports)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def after_analysis(self, analysis, model, elapsed) -> None:
        name = analysis.name or analysis.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
