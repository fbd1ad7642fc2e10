"""Optimization remarks: what a pass did, and what it was meant for but could not handle (LLVM's `-pass-remarks`).

A pass emits a remark through its context while it runs:

    am.context.remark("missed", "0 of 32 attention blocks matched: fused qkv_proj", matched_none=True)

Kinds follow LLVM: `missed` (a structure the pass targets that it could not
handle, with the reason), `passed` (what it did) and `analysis` (a fact that
explains a decision). A `missed` remark with `matched_none=True` says the pass
found nothing it was meant for and did nothing: the driver always prints those.
With `PassContext.strict`, every `missed` remark fails the pass that emitted it
(`RemarkError`, one line, no output written).

The remarks of a run are collected on `PassContext.remarks`; those a pass
emitted are also on its `PassResult.remarks`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal, TextIO

from optc.errors import OptcError
from optc.passes.infra.instruments import PassInstrument

if TYPE_CHECKING:
    from optc.ir import Model
    from optc.passes.infra.pass_base import Pass, PassResult

RemarkKind = Literal["passed", "missed", "analysis"]
REMARK_KINDS: tuple[str, ...] = ("passed", "missed", "analysis")
#: The most reasons `match_summary` lists.
MAX_REASONS = 3


@dataclasses.dataclass(frozen=True)
class Remark:
    """One remark: the pass that emitted it, its kind, and one line of text."""

    pass_name: str
    kind: RemarkKind
    message: str
    #: The pass matched none of the structures it targets (and so did nothing).
    matched_none: bool = False

    def __str__(self) -> str:
        return f"{self.pass_name}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        return {"pass": self.pass_name, "kind": self.kind, "message": self.message, "matched_none": self.matched_none}


class RemarkError(OptcError):
    """`--strict`: a pass emitted a `missed` remark."""

    def __init__(self, remark: Remark) -> None:
        self.remark = remark
        super().__init__(f"--strict: {remark}")


def check_remark(kind: str, message: str) -> None:
    """Raise `ValueError` for a kind that is not one of `REMARK_KINDS` or a message that is not one line."""
    if kind not in REMARK_KINDS:
        raise ValueError(f"remark kind must be one of {', '.join(REMARK_KINDS)}, got {kind!r}")
    if not message or "\n" in message:
        raise ValueError("a remark is one non-empty line")


def compile_filter(pattern: str) -> re.Pattern[str]:
    """The `--remarks=REGEX` filter on pass names; raises `ValueError` naming a bad expression."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--remarks: invalid regular expression {pattern!r}: {exc}") from exc


def match_summary(matched: int, reasons: Iterable[str], noun: str, verb: str = "matched") -> str:
    """`"1 of 3 attention blocks matched: fused qkv_proj (2)"`: how many candidates matched, and why the others
    did not (the most frequent reasons first, at most `MAX_REASONS` of them)."""
    counts = Counter(reasons)
    total = matched + sum(counts.values())
    if len(counts) == 1 and matched == 0:
        why = next(iter(counts))
    else:
        common = counts.most_common()
        why = ", ".join(f"{reason} ({n})" for reason, n in common[:MAX_REASONS])
        if len(common) > MAX_REASONS:
            why += f" and {len(common) - MAX_REASONS} more reasons"
    return f"{matched} of {total} {noun} {verb}" + (f": {why}" if why else "")


def unique_remarks(remarks: list[Remark]) -> list[Remark]:
    """The remarks without repeats (a pass inside `fixpoint` says the same thing every round), in order."""
    return list(dict.fromkeys(remarks))


def shown(remark: Remark, pattern: re.Pattern[str] | None) -> bool:
    """Whether a remark is printed: always when it matched nothing it was meant for, else when `pattern` names its pass."""
    if remark.kind == "missed" and remark.matched_none:
        return True
    return pattern is not None and pattern.search(remark.pass_name) is not None


class RemarkPrinter(PassInstrument):
    """Print the remarks of each pass as it finishes: `optc: remark: PASS: MESSAGE` on stderr.

    Without a pattern only the `missed` remarks of passes that matched nothing are printed;
    with one (`--remarks=REGEX`) also every remark of the passes whose name it matches.
    """

    def __init__(self, pattern: re.Pattern[str] | None = None, stream: TextIO | None = None, prog: str = "optc") -> None:
        self.pattern = pattern
        self.stream = stream
        self.prog = prog
        self._printed: set[Remark] = set()

    def after_pass(self, pass_: Pass, model: Model, result: PassResult, elapsed: float) -> None:
        for remark in result.remarks:
            if remark in self._printed or not shown(remark, self.pattern):
                continue  # a container's result repeats its children's remarks, a fixpoint its rounds
            self._printed.add(remark)
            out = self.stream or sys.stderr
            out.write(f"{self.prog}: remark: {remark}\n")


__all__ = [
    "REMARK_KINDS",
    "Remark",
    "RemarkError",
    "RemarkKind",
    "RemarkPrinter",
    "check_remark",
    "compile_filter",
    "match_summary",
    "shown",
    "unique_remarks",
]
