"""Built-in text for calibration and evaluation, from what Python itself ships.

optc fetches nothing at run time, so the default text is the help text of
Python's own `pydoc_data.topics` (about 460 kB of English prose and code
samples; the same on every machine with the same Python version).

The split is by topic, so no paragraph lands in both halves:

* the topic keys are sorted (the dict's order is not part of any contract);
* a topic whose text repeats an earlier key's text exactly is dropped (in
  Python 3.11 `else` and `if` share one text), so no text is in both splits;
* topics at even positions (0, 2, 4, ...) form the `"calib"` split, topics at
  odd positions the `"eval"` split; alternating keeps both halves a similar
  mix of language reference and library topics;
* each split is its topics' texts, in key order, joined by a blank line.

The two splits are disjoint and deterministic: calibration (`--calib`
defaults) sees only `"calib"`, `optc-eval` without `--text` scores only
`"eval"`, so the perplexity a before/after table reports is on text the
calibration did not see.

Two more texts, of other kinds and from other sources, measure how compression
holds on text unlike the calibration data (`named_text`, `--text builtin:NAME`
in `optc-eval`); calibration never reads them:

* `"code"`: Python source code with its comments and docstrings, the files
  `CODE_MODULES` of the running Python's standard library, in that order,
  joined by a blank line: the *held-out, different-source* text that
  benchmarks report;
* `"docstrings"`: English documentation prose, the docstrings (module, then
  classes and functions in source order, via `ast.get_docstring`) of the
  standard-library modules `DOCSTRING_MODULES`, joined by a blank line: a
  *development* text for choosing defaults, never the one reported.

The two module lists are disjoint, and neither module is part of
`pydoc_data`, so the three texts share no source. Like `pydoc_data.topics`,
both are fixed for a given Python version.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Literal

from optc.errors import OptcError

Split = Literal["calib", "eval"]
SPLITS: tuple[Split, ...] = ("calib", "eval")

#: How the built-in text is described in reports.
SOURCE = "pydoc_data.topics"


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions package pydoc_data separately
        raise OptcError(
            "the built-in text needs Python's pydoc_data module, which this Python lacks; give a text file instead"
        ) from exc
    return topics


def split_topics(split: Split) -> list[str]:
    """The sorted topic keys that make up one split (repeated texts counted once)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    topics = _topics()
    seen: set[str] = set()
    keys = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text not in seen:
            seen.add(text)
            keys.append(key)
    return keys[SPLITS.index(split)::2]


def builtin_text(split: Split) -> str:
    """The `"calib"` or `"eval"` half of `pydoc_data.topics` (see the module docstring)."""
    topics = _topics()
    return "\n\n".join(topics[key].strip() for key in split_topics(split))


#: Standard-library modules whose source is the `"code"` text (held out, reported).
CODE_MODULES: tuple[str, ...] = ("textwrap.py", "heapq.py", "fractions.py", "shlex.py")
#: Standard-library modules whose docstrings are the `"docstrings"` text (development: choosing defaults).
DOCSTRING_MODULES: tuple[str, ...] = ("argparse.py", "difflib.py", "configparser.py", "ipaddress.py", "calendar.py")
#: The texts `named_text` knows: the pydoc_data eval split, and the two of other kinds.
NAMED_TEXTS: dict[str, str] = {
    "topics": "the eval split of pydoc_data.topics (same source as the calibration data)",
    "code": "Python source with comments: " + ", ".join(CODE_MODULES) + " of the standard library (held out)",
    "docstrings": "docstrings of " + ", ".join(DOCSTRING_MODULES) + " of the standard library (development text)",
}


def _stdlib_source(filename: str) -> str:
    path = Path(sysconfig.get_paths()["stdlib"]) / filename
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptcError(f"the built-in text needs the standard library's {filename}, which this Python lacks ({path})") from exc


def _docstrings(source: str) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    tree = ast.parse(source)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))]
    nodes[1:] = sorted(nodes[1:], key=lambda n: (n.lineno, n.col_offset))
    return [doc for doc in (ast.get_docstring(n) for n in nodes) if doc]


def named_text(name: str) -> str:
    """One of `NAMED_TEXTS`: `"topics"` (the eval split), `"code"` or `"docstrings"` (see the module docstring)."""
    if name == "topics":
        return builtin_text("eval")
    if name == "code":
        return "\n\n".join(_stdlib_source(f).strip() for f in CODE_MODULES)
    if name == "docstrings":
        return "\n\n".join(doc for f in DOCSTRING_MODULES for doc in _docstrings(_stdlib_source(f)))
    raise OptcError(f"unknown built-in text {name!r}; expected one of {', '.join(NAMED_TEXTS)}")


def describe(split: Split) -> str:
    """One phrase naming the built-in text, for reports: `pydoc_data.topics (eval split)`."""
    return f"{SOURCE} ({split} split)"


__all__ = [
    "CODE_MODULES", "DOCSTRING_MODULES", "NAMED_TEXTS", "SPLITS", "SOURCE", "Split", "builtin_text", "describe",
    "named_text", "split_topics",
]
