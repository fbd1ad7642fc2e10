"""What the benchmark scripts share: the optc command of this environment and Markdown tables.

Imported by the scripts beside it (`sys.path` holds tools/ when one runs as `python tools/NAME.py`);
not part of the library.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path


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


__all__ = ["markdown_table", "optc_command"]
