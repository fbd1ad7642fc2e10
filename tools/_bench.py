"""What the benchmark scripts share: a row, calibration and evaluation options, the optc command, Markdown tables.

Imported by the scripts beside it (`sys.path` holds tools/ when one runs as `python tools/NAME.py`);
not part of the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


@dataclasses.dataclass
class Row:
    """One model a benchmark built: its name, file, the command that built it, and what was measured."""

    variant: str
    path: Path | None = None
    command: str = ""
    compile_s: float | None = None
    ppl: float | None = None
    size_bytes: int | None = None
    note: str = ""


def add_text_options(parser: argparse.ArgumentParser, *, samples: int = 16, seqlen: int = 256, ctx: int = 256,
                     max_tokens: int = 4096) -> None:
    """`--samples`/`--seqlen` (calibration windows) and `--ctx`/`--max-tokens` (perplexity), with this script's defaults."""
    parser.add_argument("--samples", type=int, default=samples, help=f"calibration windows (default {samples})")
    parser.add_argument("--seqlen", type=int, default=seqlen, help=f"tokens per calibration window (default {seqlen})")
    parser.add_argument("--ctx", type=int, default=ctx, help=f"tokens per evaluation window (default {ctx})")
    parser.add_argument("--max-tokens", type=int, default=max_tokens, help=f"held-out tokens scored (default {max_tokens})")


def optc_command() -> list[str]:
    """The `optc` console script of this interpreter's environment, else the one on PATH, else `python -m optc`."""
    script = Path(sys.executable).with_name("optc")
    if script.is_file():
        return [str(script)]
    found = shutil.which("optc")
    return [found] if found else [sys.executable, "-m", "optc"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, its rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["Row", "add_text_options", "markdown_table", "optc_command"]
