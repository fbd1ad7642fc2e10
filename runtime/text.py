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
"""

from __future__ import annotations

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


def describe(split: Split) -> str:
    """One phrase naming the built-in text, for reports: `pydoc_data.topics (eval split)`."""
    return f"{SOURCE} ({split} split)"


__all__ = ["SPLITS", "SOURCE", "Split", "builtin_text", "describe", "split_topics"]
